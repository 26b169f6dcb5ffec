//! `clustermesh-apiserver`: the per-cluster control plane (cluster config, services, policies).

use clap::Parser;

/// Per-cluster control plane of meshd. Not built yet: see the open issue for the apiserver.
#[derive(Debug, Parser)]
#[command(name = "clustermesh-apiserver", version)]
struct Cli {
    #[command(flatten)]
    telemetry: meshd_telemetry::TelemetryArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    meshd_telemetry::init(&cli.telemetry)?;
    anyhow::bail!("clustermesh-apiserver is not built yet")
}
