//! `meshd status` (the node, its endpoints, the datapath and a line per cluster) and
//! `meshd clustermesh status` (the clusters in detail), as a table or `-o json`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use meshd_api::pb;

use crate::endpoint_cmd::{endpoint_json, status_error, user_labels, SocketArgs};
use crate::output::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum ClustermeshCommand {
    /// Every cluster this node sees: connected, ready, stale, counts, last error.
    Status(StatusArgs),
}

async fn fetch(socket: &SocketArgs) -> anyhow::Result<pb::StatusResponse> {
    let mut client = meshd_api::connect(&socket.socket).await?;
    Ok(client
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner())
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

fn ago(now_ms: u64, t: u64) -> String {
    if t == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(t) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
    }
}

fn now_ms() -> u64 {
    crate::agent::now_ms()
}

/// The state word of a cluster.
pub fn cluster_state(c: &pb::ClusterStatus) -> &'static str {
    if !c.refused.is_empty() {
        "refused"
    } else if c.stale_since_ms != 0 {
        "stale"
    } else if c.connected && c.ready {
        "ready"
    } else if c.connected {
        "syncing"
    } else {
        "connecting"
    }
}

pub fn cluster_json(c: &pb::ClusterStatus) -> serde_json::Value {
    serde_json::json!({
        "name": c.name,
        "cluster_id": c.cluster_id,
        "local": c.local,
        "state": cluster_state(c),
        "connected": c.connected,
        "ready": c.ready,
        "stale": c.stale_since_ms != 0,
        "stale_since_ms": c.stale_since_ms,
        "last_error": c.last_error,
        "refused": c.refused,
        "nodes": c.nodes,
        "endpoints": c.endpoints,
        "identities": c.identities,
        "policies": c.policies,
        "last_sync_ms": c.last_sync_ms,
        "rejected": c.rejected,
        "etcd_endpoints": c.etcd_endpoints,
    })
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    let node = s.node.clone().unwrap_or_default();
    let dp = s.datapath.clone().unwrap_or_default();
    serde_json::json!({
        "node": {
            "name": node.name,
            "cluster": node.cluster,
            "cluster_id": node.cluster_id,
            "node_ip": node.node_ip,
            "pod_cidr": node.pod_cidr,
            "lease_id": node.lease_id,
            "published": node.published,
            "started_ms": node.started_ms,
            "version": node.version,
        },
        "endpoints": s.endpoints.iter().map(endpoint_json).collect::<Vec<_>>(),
        "clusters": s.clusters.iter().map(cluster_json).collect::<Vec<_>>(),
        "datapath": {
            "pin_dir": dp.pin_dir,
            "ipcache_entries": dp.ipcache_entries,
            "endpoint_entries": dp.endpoint_entries,
            "node_entries": dp.node_entries,
            "policy_entries": dp.policy_entries,
            "reconciles": dp.reconciles,
            "last_reconcile_ms": dp.last_reconcile_ms,
            "last_error": dp.last_error,
            "counters": dp.counters.iter().map(counter_json).collect::<Vec<_>>(),
            "service_entries": dp.service_entries,
            "full_diffs": dp.full_diffs,
            "corrections": dp.corrections,
            "failed_writes": dp.failed_writes,
        },
    })
}

fn counter_json(c: &pb::DatapathCounter) -> serde_json::Value {
    serde_json::json!({
        "direction": c.direction,
        "reason": c.reason,
        "reason_name": c.reason_name,
        "packets": c.packets,
        "bytes": c.bytes,
    })
}

fn print_clusters(clusters: &[pb::ClusterStatus]) {
    let now = now_ms();
    println!(
        "{:<12} {:>3} {:<10} {:>6} {:>9} {:>10} {:>8} {:<14} {:<14} LAST ERROR",
        "CLUSTER",
        "ID",
        "STATE",
        "NODES",
        "ENDPOINTS",
        "IDENTITIES",
        "REJECTED",
        "LAST SYNC",
        "STALE SINCE"
    );
    for c in clusters {
        let name = if c.local {
            format!("{} (local)", c.name)
        } else {
            c.name.clone()
        };
        let err = if !c.refused.is_empty() {
            c.refused.as_str()
        } else {
            c.last_error.as_str()
        };
        println!(
            "{:<12} {:>3} {:<10} {:>6} {:>9} {:>10} {:>8} {:<14} {:<14} {}",
            name,
            c.cluster_id,
            cluster_state(c),
            c.nodes,
            c.endpoints,
            c.identities,
            c.rejected,
            ago(now, c.last_sync_ms),
            if c.stale_since_ms == 0 {
                "-".to_string()
            } else {
                ago(now, c.stale_since_ms)
            },
            err
        );
    }
}

pub fn run_status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let s = block_on(fetch(&args.socket))?;
    match args.output.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&status_json(&s))?),
        Format::Table => {
            let node = s.node.clone().unwrap_or_default();
            let dp = s.datapath.clone().unwrap_or_default();
            println!(
                "Node:      {} (cluster {}, id {}), IP {}, pod CIDR {}",
                node.name, node.cluster, node.cluster_id, node.node_ip, node.pod_cidr
            );
            println!(
                "Lease:     {}",
                if node.published {
                    format!("{:x}", node.lease_id)
                } else {
                    "none (local etcd unreachable?)".into()
                }
            );
            println!(
                "Datapath:  {} ipcache, {} endpoints, {} nodes, {} policy entries; {} reconciles, last {}{}",
                dp.ipcache_entries,
                dp.endpoint_entries,
                dp.node_entries,
                dp.policy_entries,
                dp.reconciles,
                ago(now_ms(), dp.last_reconcile_ms),
                if dp.last_error.is_empty() {
                    String::new()
                } else {
                    format!(", error: {}", dp.last_error)
                }
            );
            println!(
                "           {} full diffs, {} corrections, {} failed writes",
                dp.full_diffs, dp.corrections, dp.failed_writes
            );
            let drops: Vec<&pb::DatapathCounter> =
                dp.counters.iter().filter(|c| c.reason < 0).collect();
            let forwarded: u64 = dp
                .counters
                .iter()
                .filter(|c| c.reason > 0)
                .map(|c| c.packets)
                .sum();
            println!(
                "Packets:   {forwarded} forwarded, {} dropped{}",
                drops.iter().map(|c| c.packets).sum::<u64>(),
                if drops.is_empty() {
                    ""
                } else {
                    " (meshd monitor shows them as they happen)"
                }
            );
            for c in drops {
                println!(
                    "  {:<24} {:<8} {:>10} packets",
                    c.reason_name, c.direction, c.packets
                );
            }
            println!("Endpoints: {}", s.endpoints.len());
            for e in &s.endpoints {
                println!(
                    "  {:<20} {:<15} identity {:<8} {}",
                    e.name,
                    e.ip,
                    e.identity,
                    user_labels(e)
                );
            }
            println!();
            print_clusters(&s.clusters);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_clustermesh(cmd: ClustermeshCommand) -> anyhow::Result<ExitCode> {
    let ClustermeshCommand::Status(args) = cmd;
    let s = block_on(fetch(&args.socket))?;
    match args.output.format {
        Format::Json => {
            let v: Vec<serde_json::Value> = s.clusters.iter().map(cluster_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "clusters": v }))?
            );
        }
        Format::Table => print_clusters(&s.clusters),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        let mut c = pb::ClusterStatus {
            connected: true,
            ready: true,
            ..Default::default()
        };
        assert_eq!(cluster_state(&c), "ready");
        c.stale_since_ms = 5;
        assert_eq!(cluster_state(&c), "stale");
        c.refused = "id conflict".into();
        assert_eq!(cluster_state(&c), "refused");
        assert_eq!(ago(10_000, 0), "never");
        assert_eq!(ago(70_000, 5_000), "1m5s ago");
    }
}
