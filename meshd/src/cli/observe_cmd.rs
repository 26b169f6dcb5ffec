//! `meshd observe`: every new connection and every drop on the node, as it happens: verdict,
//! direction, addresses and ports, protocol, both identities with their labels, and the service
//! frontend a load-balanced connection was sent to. Filters narrow it down; `--since` starts
//! with what the agent still holds (a bounded history); `-o json` prints one object per line.
//!
//! The datapath reports at most its configured number of events per second per CPU (agent
//! config `flow_event_rate`); what it did not send is counted and said here, as is what this
//! command missed by reading too slowly.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use meshd_api::pb;

use super::endpoint_cmd::{status_error, SocketArgs};
use super::monitor_cmd::{
    clock, endpoint, identity_display, node_and_clusters, proto_name, run_stream, who,
};
use super::output::{Format, OutputArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerdictFilter {
    /// New connections the datapath let through.
    #[value(alias = "allowed")]
    Forwarded,
    /// Dropped packets.
    #[value(alias = "denied")]
    Dropped,
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Only flows whose source has this label (KEY=VALUE, or KEY for any value); repeatable,
    /// all must match.
    #[arg(long, value_name = "LABEL")]
    from_label: Vec<String>,
    /// Only flows whose destination has this label (as --from-label).
    #[arg(long, value_name = "LABEL")]
    to_label: Vec<String>,
    /// Only new connections (forwarded) or only drops.
    #[arg(long, value_enum)]
    verdict: Option<VerdictFilter>,
    /// Only this protocol: tcp, udp, icmp or a number.
    #[arg(long, value_name = "PROTO", value_parser = parse_protocol)]
    protocol: Option<u32>,
    /// Only flows with this source, destination or service port.
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Only flows with an endpoint of this cluster on either side.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// Start with the flows the agent kept from this long ago (e.g. 30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// Exit after this many flows (default: run until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
}

fn parse_protocol(s: &str) -> Result<u32, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        n => n
            .parse::<u8>()
            .map(u32::from)
            .map_err(|_| format!("{s:?}: expected tcp, udp, icmp or a protocol number")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 30s, 5m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// A label filter against a "k=v,k=v" label list.
fn has_label(labels: &str, want: &str) -> bool {
    labels.split(',').any(|l| {
        l == want || (!want.contains('=') && l.split_once('=').is_some_and(|(k, _)| k == want))
    })
}

/// The cluster of an identity's side: its label, else its cluster bits.
fn side_cluster<'a>(
    id: u32,
    labels: &'a str,
    clusters: &'a BTreeMap<u32, String>,
) -> Option<&'a str> {
    labels
        .split(',')
        .find_map(|l| l.strip_prefix("meshd.io/cluster="))
        .or_else(|| {
            let cid = (id >> meshd_ebpf::abi::IDENTITY_CLUSTER_SHIFT)
                & meshd_ebpf::abi::IDENTITY_CLUSTER_MASK;
            clusters.get(&cid).map(String::as_str)
        })
}

impl ObserveArgs {
    fn matches(&self, f: &pb::FlowNotification, clusters: &BTreeMap<u32, String>) -> bool {
        let verdict_ok = match self.verdict {
            None => true,
            Some(VerdictFilter::Forwarded) => f.verdict == "forwarded",
            Some(VerdictFilter::Dropped) => f.verdict == "dropped",
        };
        let service_port = f
            .service
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u32>().ok());
        let port_ok = self.port.is_none_or(|p| {
            let p = u32::from(p);
            f.sport == p || f.dport == p || service_port == Some(p)
        });
        let cluster_ok = self.cluster.as_deref().is_none_or(|c| {
            side_cluster(f.src_identity, &f.src_labels, clusters) == Some(c)
                || side_cluster(f.dst_identity, &f.dst_labels, clusters) == Some(c)
        });
        verdict_ok
            && port_ok
            && cluster_ok
            && self.protocol.is_none_or(|p| f.proto == p)
            && self.from_label.iter().all(|l| has_label(&f.src_labels, l))
            && self.to_label.iter().all(|l| has_label(&f.dst_labels, l))
    }
}

fn line(f: &pb::FlowNotification, clusters: &BTreeMap<u32, String>) -> String {
    let service = if f.service.is_empty() {
        String::new()
    } else {
        format!(" via service {}", f.service)
    };
    format!(
        "{} {} {:<9} {:<24} {:<7} {:<4} {} ({}) -> {} ({}){service}",
        clock(f.time_ms),
        f.node,
        f.verdict.to_uppercase(),
        f.reason_name,
        f.direction,
        proto_name(f.proto),
        endpoint(&f.saddr, f.sport, f.proto),
        who(f.src_identity, &f.src_labels, clusters),
        endpoint(&f.daddr, f.dport, f.proto),
        who(f.dst_identity, &f.dst_labels, clusters),
    )
}

/// "k=v,k=v" as a JSON object.
fn labels_json(labels: &str) -> serde_json::Value {
    labels
        .split(',')
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn json(f: &pb::FlowNotification, clusters: &BTreeMap<u32, String>) -> serde_json::Value {
    let side = |id: u32, addr: &str, port: u32, labels: &str| {
        serde_json::json!({
            "address": addr,
            "port": port,
            "identity": id,
            "name": identity_display(id, clusters),
            "cluster": side_cluster(id, labels, clusters),
            "labels": labels_json(labels),
        })
    };
    serde_json::json!({
        "time_ms": f.time_ms,
        "timestamp_ns": f.timestamp_ns,
        "node": f.node,
        "verdict": f.verdict,
        "reason": f.reason,
        "reason_name": f.reason_name,
        "direction": f.direction,
        "proto": f.proto,
        "protocol": proto_name(f.proto),
        "source": side(f.src_identity, &f.saddr, f.sport, &f.src_labels),
        "destination": side(f.dst_identity, &f.daddr, f.dport, &f.dst_labels),
        "service": (!f.service.is_empty()).then_some(&f.service),
        "ifindex": f.ifindex,
        "missed_before": f.missed_before,
        "datapath_lost": f.datapath_lost,
    })
}

async fn stream(args: &ObserveArgs) -> anyhow::Result<()> {
    let mut client = meshd_api::connect(&args.socket.socket).await?;
    let (node, clusters) = node_and_clusters(&mut client).await?;
    let since_ms = args.since.map_or(0, |d| {
        meshd_agent::now_ms()
            .saturating_sub(d.as_millis() as u64)
            .max(1)
    });
    let mut flows = client
        .observe(pb::ObserveRequest { since_ms })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.output.format == Format::Table {
        eprintln!("meshd observe: new connections and drops on node {node} (Ctrl-C to stop)");
    }
    let mut seen = 0u64;
    let mut lost_seen: Option<u64> = None;
    while let Some(f) = flows
        .message()
        .await
        .map_err(status_error)
        .context("reading flows from the agent")?
    {
        if f.missed_before > 0 {
            eprintln!(
                "meshd observe: {} flows not shown (this output was too slow)",
                f.missed_before
            );
        }
        // The datapath's count is since its maps were created: report what it adds while we
        // watch, and the total once at the start.
        match lost_seen {
            None if f.datapath_lost > 0 => eprintln!(
                "meshd observe: the datapath has not sent {} events so far (over its rate limit, flow_event_rate)",
                f.datapath_lost
            ),
            Some(before) if f.datapath_lost > before => eprintln!(
                "meshd observe: {} more events not sent by the datapath (over its rate limit, flow_event_rate)",
                f.datapath_lost - before
            ),
            _ => {}
        }
        lost_seen = Some(f.datapath_lost);
        if !args.matches(&f, &clusters) {
            continue;
        }
        match args.output.format {
            Format::Json => println!("{}", json(&f, &clusters)),
            Format::Table => println!("{}", line(&f, &clusters)),
        }
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            return Ok(());
        }
    }
    anyhow::bail!("the agent closed the flow stream (agent stopped?)")
}

pub fn run(args: ObserveArgs) -> anyhow::Result<ExitCode> {
    run_stream(stream(&args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ObserveArgs,
    }

    fn args(argv: &[&str]) -> ObserveArgs {
        Cli::try_parse_from(std::iter::once("observe").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    fn flow() -> pb::FlowNotification {
        pb::FlowNotification {
            verdict: "forwarded".into(),
            proto: 6,
            sport: 40000,
            dport: 8080,
            src_identity: (1 << 16) | 256,
            dst_identity: (2 << 16) | 300,
            src_labels: "app=web,meshd.io/cluster=c1".into(),
            dst_labels: "app=echo,meshd.io/cluster=c2".into(),
            service: "10.96.0.1:80".into(),
            ..Default::default()
        }
    }

    #[test]
    fn filters_select_by_labels_verdict_protocol_port_and_cluster() {
        let clusters = BTreeMap::from([(1, "c1".to_string()), (2, "c2".to_string())]);
        let f = flow();
        for (argv, want) in [
            (&[][..], true),
            (&["--from-label", "app=web"][..], true),
            (&["--from-label", "app"][..], true),
            (&["--from-label", "app=echo"][..], false),
            (
                &["--to-label", "app=echo", "--from-label", "app=web"][..],
                true,
            ),
            (&["--verdict", "forwarded"][..], true),
            (&["--verdict", "allowed"][..], true),
            (&["--verdict", "dropped"][..], false),
            (&["--protocol", "tcp"][..], true),
            (&["--protocol", "17"][..], false),
            (&["--port", "8080"][..], true),
            (&["--port", "80"][..], true),
            (&["--port", "81"][..], false),
            (&["--cluster", "c2"][..], true),
            (&["--cluster", "c3"][..], false),
        ] {
            assert_eq!(args(argv).matches(&f, &clusters), want, "{argv:?}");
        }
        assert_eq!(
            args(&["--since", "5m"]).since,
            Some(Duration::from_secs(300))
        );
        assert!(parse_duration("5d").is_err());
        assert!(parse_protocol("sctp").is_err());
        let j = json(&f, &clusters);
        assert_eq!(j["source"]["labels"]["app"], "web");
        assert_eq!(j["destination"]["cluster"], "c2");
        assert_eq!(j["service"], "10.96.0.1:80");
    }
}
