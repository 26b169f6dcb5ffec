//! `meshd status` (the node, its endpoints, the datapath and a line per cluster) and
//! `meshd clustermesh status` (the clusters in detail), as a table or `-o json`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use meshd_api::{cluster_state, pb};

use super::endpoint_cmd::{endpoint_json, status_error, user_labels, SocketArgs};
use super::output::{Format, OutputArgs};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct ClustermeshStatusArgs {
    #[command(flatten)]
    status: StatusArgs,
    /// Wait until every cluster the node sees is ready (connected and synced), printing each
    /// change of state on stderr; exit 1 naming the clusters that are not when --timeout
    /// passes. For scripts that bring up a mesh.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, requires = "wait")]
    timeout: u64,
}

#[derive(Debug, clap::Subcommand)]
pub enum ClustermeshCommand {
    /// Every cluster this node sees: connected, ready, stale, counts, last error.
    Status(ClustermeshStatusArgs),
    /// Let another cluster's agents read this cluster (etcd user remote-CLUSTER, read-only on
    /// the shared prefixes). Run against this cluster's etcd with its admin certificate; the
    /// other cluster reads with its own `remote` certificate (CN remote-CLUSTER).
    Connect(super::etcd_cmd::ConnectArgs),
    /// Cut another cluster off: removes etcd user remote-CLUSTER, leaving every other cluster's
    /// access and every certificate as they are. Its agents report "permission denied" in
    /// `meshd clustermesh status` and keep their last state (fail-static).
    Disconnect(super::etcd_cmd::ConnectArgs),
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
    meshd_agent::now_ms()
}

pub fn cluster_json(c: &pb::ClusterStatus) -> serde_json::Value {
    serde_json::json!({
        "name": c.name,
        "cluster_id": c.cluster_id,
        "local": c.local,
        "state": cluster_state(c),
        "connected": c.connected,
        "access_denied": c.access_denied,
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
        "pending": c.pending,
        "malformed": c.malformed,
        "entry_limit": c.entry_limit,
        "entries_held": c.entries_held,
        "over_limit": c.over_limit,
        "degraded": c.degraded,
        "etcd_endpoints": c.etcd_endpoints,
        "source": c.source,
        "cache": c.cache.as_ref().map(|m| serde_json::json!({
            "connected": m.connected,
            "ready": m.ready,
            "stale_since_ms": m.stale_since_ms,
            "last_sync_ms": m.last_sync_ms,
            "entries": m.entries,
            "rejected": m.rejected,
            "limit": m.limit,
            "lag_ms": m.lag_ms,
            "last_error": m.last_error,
            "over_limit": m.over_limit,
            "oversized": m.oversized,
        })),
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
        "certificates": s.certificates.iter().map(certificate_json).collect::<Vec<_>>(),
        "warnings": s.warnings,
        "routing": routing_json(&s.routing.clone().unwrap_or_default()),
    })
}

fn routing_json(r: &pb::RoutingStatus) -> serde_json::Value {
    serde_json::json!({
        "mode": r.mode,
        "native_routing_cidr": r.native_routing_cidr,
        "auto_direct_node_routes": r.auto_direct_node_routes,
        "routes_installed": r.routes_installed,
        "skipped_nodes": r.skipped_nodes,
        "skipped_total": r.skipped_total,
        "route_failures": r.route_failures,
        "route_error": r.route_error,
        "outside_native_cidr": r.outside_native_cidr,
        "route_protocol": r.route_protocol,
        "service_lb_mode": r.service_lb_mode,
    })
}

/// The routing lines of `meshd status`: the mode, what native mode asks of the underlay, the
/// agent's node routes and what it could not route.
fn print_routing(r: &pb::RoutingStatus) {
    // An agent older than the field sends it empty: it knows SNAT only.
    let lb_mode = if r.service_lb_mode.is_empty() {
        "snat"
    } else {
        &r.service_lb_mode
    };
    if r.mode != "native" {
        println!(
            "Routing:   {} (VXLAN), service_lb_mode {lb_mode}",
            if r.mode.is_empty() { "tunnel" } else { &r.mode }
        );
        return;
    }
    println!(
        "Routing:   native, native_routing_cidr {}, auto_direct_node_routes {}, service_lb_mode {lb_mode}",
        r.native_routing_cidr, r.auto_direct_node_routes
    );
    println!(
        "           the underlay must be trusted: a packet's source address is its identity (no tunnel, no authentication)"
    );
    if r.auto_direct_node_routes {
        println!(
            "           {} node routes (proto {}), {} nodes skipped (not on the uplink's segment), {} route failures{}",
            r.routes_installed,
            r.route_protocol,
            r.skipped_nodes.len(),
            r.route_failures,
            if r.route_error.is_empty() {
                String::new()
            } else {
                format!(", last error: {}", r.route_error)
            }
        );
        for line in &r.skipped_nodes {
            println!("  skipped: {line}");
        }
    }
    for line in &r.outside_native_cidr {
        println!("WARNING: {line}");
    }
}

fn certificate_json(c: &pb::CertificateStatus) -> serde_json::Value {
    serde_json::json!({
        "used_for": c.used_for,
        "kind": c.kind,
        "path": c.path,
        "subject": c.subject,
        "not_after_ms": c.not_after_ms,
        "days_left": c.days_left,
        "expiring": c.expiring,
        "error": c.error,
    })
}

/// One line per certificate or CA in use that expires within the agent's warning window (or
/// cannot be read), saying what to do.
fn print_certificate_warnings(certificates: &[pb::CertificateStatus]) {
    for c in certificates.iter().filter(|c| c.expiring) {
        let what = format!("{} {} ({})", c.kind, c.path, c.used_for);
        if !c.error.is_empty() {
            println!("WARNING: {what}: {}", c.error);
        } else if c.days_left < 0 {
            println!(
                "WARNING: {what}, {}: expired {} days ago; rotate it (`meshd certs rotate`)",
                c.subject, -c.days_left
            );
        } else {
            println!(
                "WARNING: {what}, {}: expires in {} days; rotate it (`meshd certs rotate`{})",
                c.subject,
                c.days_left,
                if c.kind == "ca" {
                    ", and move the mesh to a new CA"
                } else {
                    ""
                }
            );
        }
    }
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
        } else if !c.last_error.is_empty() {
            c.last_error.as_str()
        } else {
            c.degraded.as_str()
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
    let cached: Vec<_> = clusters
        .iter()
        .filter_map(|c| c.cache.as_ref().map(|m| (c, m)))
        .collect();
    if !cached.is_empty() {
        println!("\nCache (the mirror's view of each remote):");
        println!(
            "{:<12} {:<9} {:<5} {:>9} {:>8} {:>9} {:>7} {:<14} {:<14} LAST ERROR",
            "CLUSTER",
            "CONNECTED",
            "READY",
            "ENTRIES",
            "REJECTED",
            "LIMIT",
            "LAG",
            "LAST SYNC",
            "STALE SINCE"
        );
        for (c, m) in cached {
            println!(
                "{:<12} {:<9} {:<5} {:>9} {:>8} {:>9} {:>7} {:<14} {:<14} {}",
                c.name,
                if m.connected { "yes" } else { "no" },
                if m.ready { "yes" } else { "no" },
                m.entries,
                m.rejected,
                m.limit,
                format!("{}ms", m.lag_ms),
                ago(now, m.last_sync_ms),
                if m.stale_since_ms == 0 {
                    "-".to_string()
                } else {
                    ago(now, m.stale_since_ms)
                },
                m.last_error
            );
        }
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
            print_routing(&s.routing.clone().unwrap_or_default());
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
            print_certificate_warnings(&s.certificates);
            for w in &s.warnings {
                println!("WARNING: {w}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_clustermesh(cmd: ClustermeshCommand) -> anyhow::Result<ExitCode> {
    let (args, wait) = match cmd {
        ClustermeshCommand::Status(args) => {
            let wait = args
                .wait
                .then(|| std::time::Duration::from_secs(args.timeout));
            (args.status, wait)
        }
        ClustermeshCommand::Connect(args) => return super::etcd_cmd::connect(&args),
        ClustermeshCommand::Disconnect(args) => return super::etcd_cmd::disconnect(&args),
    };
    let (s, all_ready) = match wait {
        None => (block_on(fetch(&args.socket))?, true),
        Some(timeout) => block_on(wait_ready(&args.socket, timeout))?,
    };
    match args.output.format {
        Format::Json => {
            let v: Vec<serde_json::Value> = s.clusters.iter().map(cluster_json).collect();
            let certs: Vec<serde_json::Value> =
                s.certificates.iter().map(certificate_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "clusters": v, "certificates": certs })
                )?
            );
        }
        Format::Table => {
            print_clusters(&s.clusters);
            print_certificate_warnings(&s.certificates);
        }
    }
    if !all_ready {
        let waiting: Vec<String> = not_ready(&s.clusters)
            .into_iter()
            .map(|(name, state)| format!("{name} ({state})"))
            .collect();
        eprintln!(
            "meshd: clusters not ready when the timeout passed: {}",
            waiting.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The clusters that are not ready, with their state.
fn not_ready(clusters: &[pb::ClusterStatus]) -> Vec<(String, &'static str)> {
    clusters
        .iter()
        .map(|c| (c.name.clone(), cluster_state(c)))
        // A degraded cluster is as synced as it will get (served, over its entry limit).
        .filter(|(_, state)| !matches!(*state, "ready" | "degraded"))
        .collect()
}

/// Polls the agent until every cluster is ready or `timeout` passes; the last status and
/// whether all were ready. A node that cannot be asked yet (starting) counts as not ready.
async fn wait_ready(
    socket: &SocketArgs,
    timeout: std::time::Duration,
) -> anyhow::Result<(pb::StatusResponse, bool)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Vec<(String, &'static str)> = Vec::new();
    loop {
        let fetched = fetch(socket).await;
        if let Ok(s) = &fetched {
            let waiting = not_ready(&s.clusters);
            if waiting != last {
                for (name, state) in &waiting {
                    eprintln!("waiting: {name} {state}");
                }
                last = waiting;
            }
            if last.is_empty() && !s.clusters.is_empty() {
                return Ok((fetched?, true));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return match fetched {
                Ok(s) => Ok((s, false)),
                Err(e) => Err(e.context(format!("no answer from the agent within {timeout:?}"))),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
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
        c.degraded = "over its entry limit".into();
        assert_eq!(cluster_state(&c), "degraded");
        c.stale_since_ms = 5;
        assert_eq!(cluster_state(&c), "stale");
        c.refused = "id conflict".into();
        assert_eq!(cluster_state(&c), "refused");
        assert_eq!(ago(10_000, 0), "never");
        assert_eq!(ago(70_000, 5_000), "1m5s ago");
    }
}
