//! `clustermesh-apiserver`: the per-cluster control plane (cluster config, services, policies,
//! identity GC). Flags, optionally over a YAML file (`--config`); see `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clustermesh_apiserver::{Apiserver, ConfigArgs};

/// Per-cluster control plane of meshd: serves the manifest API over mTLS, allocates service
/// VIPs, publishes service backends and collects unused identities.
#[derive(Debug, Parser)]
#[command(name = "clustermesh-apiserver", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    telemetry: meshd_telemetry::TelemetryArgs,
    /// YAML file with the settings below (kebab-case keys, e.g. `cluster-name: c1`); flags win.
    #[arg(long, value_name = "FILE", env = "MESHD_APISERVER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ConfigArgs,
}

/// Exit code of a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes exported spans.
    let _telemetry = match meshd_telemetry::init(&cli.telemetry, "clustermesh-apiserver") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("clustermesh-apiserver: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let file = match &cli.config {
        Some(path) => match ConfigArgs::from_file(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("clustermesh-apiserver: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => ConfigArgs::default(),
    };
    let config = match cli.settings.over(file).build() {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("clustermesh-apiserver: invalid configuration:");
            for e in errors {
                eprintln!("  {e}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("clustermesh-apiserver: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let mut server = Apiserver::start(config).await?;
        // systemd (Type=notify) hears READY=1 once the apiserver can do its job (what /readyz
        // reports); without NOTIFY_SOCKET nothing is sent.
        let health = server.health.clone();
        tokio::spawn(async move {
            while health.readiness().is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            let _ = sd_notify::notify(
                false,
                &[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status("serving"),
                ],
            );
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|source| clustermesh_apiserver::ApiserverError::Listen {
                what: "signal handler",
                addr: "SIGTERM".into(),
                source,
            })?;
        tokio::select! {
            r = server.wait() => r,
            _ = tokio::signal::ctrl_c() => server.shutdown().await,
            _ = term.recv() => server.shutdown().await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clustermesh-apiserver: {e}");
            ExitCode::FAILURE
        }
    }
}
