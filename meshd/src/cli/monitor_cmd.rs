//! `meshd monitor`: every packet the node's datapath drops, as it happens, with the reason, the
//! addresses and the identities (shown as `<cluster>/<identity>` and their labels), one line each; `-o json`
//! prints one JSON object per line for scripts. The first tool to reach for when traffic does
//! not get through: a policy drop names the identities the policy saw.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use meshd_api::pb;

use super::endpoint_cmd::{status_error, SocketArgs};
use super::output::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Exit after this many drops (default: run until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
}

/// Identities carry their cluster id in bits 16-23 (DESIGN.md); numbers below 256 are the
/// reserved ones (host, world, remote-node).
pub(super) fn identity_display(id: u32, clusters: &BTreeMap<u32, String>) -> String {
    if id == 0 {
        return "?".into();
    }
    let cluster_id =
        (id >> meshd_ebpf::abi::IDENTITY_CLUSTER_SHIFT) & meshd_ebpf::abi::IDENTITY_CLUSTER_MASK;
    let local = id & 0xffff;
    match (cluster_id, id) {
        (0, meshd_ebpf::abi::IDENTITY_HOST) => "host".into(),
        (0, meshd_ebpf::abi::IDENTITY_WORLD) => "world".into(),
        (0, meshd_ebpf::abi::IDENTITY_REMOTE_NODE) => "remote-node".into(),
        (0, _) => format!("reserved/{id}"),
        _ => match clusters.get(&cluster_id) {
            Some(name) => format!("{name}/{local}"),
            None => format!("cluster-{cluster_id}/{local}"),
        },
    }
}

pub(super) fn proto_name(proto: u32) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        p => format!("proto-{p}"),
    }
}

pub(super) fn endpoint(addr: &str, port: u32, proto: u32) -> String {
    if proto == 6 || proto == 17 {
        format!("{addr}:{port}")
    } else {
        addr.to_owned()
    }
}

/// `cluster/number labels`, the labels without the cluster one (already shown).
pub(super) fn who(id: u32, labels: &str, clusters: &BTreeMap<u32, String>) -> String {
    let shown: Vec<&str> = labels
        .split(',')
        .filter(|l| !l.is_empty() && !l.starts_with("meshd.io/cluster="))
        .collect();
    let id = identity_display(id, clusters);
    if shown.is_empty() {
        id
    } else {
        format!("{id} {}", shown.join(","))
    }
}

fn line(d: &pb::DropNotification, clusters: &BTreeMap<u32, String>) -> String {
    format!(
        "{} DROP {:<24} {:<7} {:<4} {} ({}) -> {} ({}) ifindex {}",
        wall_clock(),
        d.reason_name,
        d.direction,
        proto_name(d.proto),
        endpoint(&d.saddr, d.sport, d.proto),
        who(d.src_identity, &d.src_labels, clusters),
        endpoint(&d.daddr, d.dport, d.proto),
        who(d.dst_identity, &d.dst_labels, clusters),
        d.ifindex,
    )
}

fn json(d: &pb::DropNotification, clusters: &BTreeMap<u32, String>) -> serde_json::Value {
    serde_json::json!({
        "timestamp_ns": d.timestamp_ns,
        "reason": d.reason,
        "reason_name": d.reason_name,
        "direction": d.direction,
        "proto": d.proto,
        "saddr": d.saddr,
        "sport": d.sport,
        "daddr": d.daddr,
        "dport": d.dport,
        "src_identity": d.src_identity,
        "src": identity_display(d.src_identity, clusters),
        "src_labels": d.src_labels,
        "dst_identity": d.dst_identity,
        "dst": identity_display(d.dst_identity, clusters),
        "dst_labels": d.dst_labels,
        "ifindex": d.ifindex,
        "missed_before": d.missed_before,
    })
}

/// HH:MM:SS.mmm (UTC) of now: when the drop reached this command.
fn wall_clock() -> String {
    clock(meshd_agent::now_ms())
}

/// HH:MM:SS.mmm (UTC) of a Unix time in ms.
pub(super) fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// The agent's node name and the cluster names of the identities' cluster ids.
pub(super) async fn node_and_clusters(
    client: &mut meshd_api::AgentClient<tonic::transport::Channel>,
) -> anyhow::Result<(String, BTreeMap<u32, String>)> {
    let status = client
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let clusters = status
        .clusters
        .iter()
        .filter(|c| c.cluster_id != 0)
        .map(|c| (c.cluster_id, c.name.clone()))
        .collect();
    Ok((status.node.map(|n| n.name).unwrap_or_default(), clusters))
}

async fn stream(args: &MonitorArgs) -> anyhow::Result<()> {
    let mut client = meshd_api::connect(&args.socket.socket).await?;
    let (node, clusters) = node_and_clusters(&mut client).await?;
    let mut drops = client
        .monitor(pb::MonitorRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.output.format == Format::Table {
        eprintln!("meshd monitor: drops on node {node} as they happen (Ctrl-C to stop)");
    }
    let mut seen = 0u64;
    while let Some(d) = drops
        .message()
        .await
        .map_err(status_error)
        .context("reading drop events from the agent")?
    {
        if d.missed_before > 0 {
            eprintln!(
                "meshd monitor: {} drops not shown (this output was too slow)",
                d.missed_before
            );
        }
        match args.output.format {
            Format::Json => println!("{}", json(&d, &clusters)),
            Format::Table => println!("{}", line(&d, &clusters)),
        }
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            return Ok(());
        }
    }
    anyhow::bail!("the agent closed the event stream (agent stopped?)")
}

/// Runs a streaming command to its end on a current-thread runtime.
pub(super) fn run_stream(
    stream: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(stream)?;
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: MonitorArgs) -> anyhow::Result<ExitCode> {
    run_stream(stream(&args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_shown_with_their_cluster() {
        let clusters = BTreeMap::from([(1, "c1".to_string())]);
        assert_eq!(identity_display((1 << 16) | 1000, &clusters), "c1/1000");
        assert_eq!(
            identity_display((7 << 16) | 300, &clusters),
            "cluster-7/300"
        );
        assert_eq!(identity_display(2, &clusters), "world");
        assert_eq!(identity_display(0, &clusters), "?");
        assert_eq!(endpoint("10.0.0.1", 80, 6), "10.0.0.1:80");
        assert_eq!(endpoint("10.0.0.1", 7, 1), "10.0.0.1");
        assert_eq!(
            who(
                (1 << 16) | 256,
                "app=echo,meshd.io/cluster=c1,meshd.io/namespace=default",
                &clusters
            ),
            "c1/256 app=echo,meshd.io/namespace=default"
        );
        assert_eq!(who(2, "", &clusters), "world");
    }
}
