//! `meshd-otlp-collector`: the labs' OTLP/gRPC trace collector (see the library's docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Parser;

use meshd_otlp_collector::{api, serve_grpc, SpanStore, TraceSink};

/// Receives OpenTelemetry traces over OTLP/gRPC (what `--otlp-endpoint` of meshd and
/// clustermesh-apiserver sends), writes each span as a JSON line, and answers
/// `GET /api/spans?service=&host=&name=&limit=` with the most recent spans.
#[derive(Debug, Parser)]
#[command(name = "meshd-otlp-collector", version)]
struct Args {
    /// Address of the OTLP/gRPC trace service (exporters point `--otlp-endpoint
    /// http://ADDR` here).
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: SocketAddr,
    /// Address of the HTTP API (`/api/spans`, `/metrics`, `/healthz`); off when not given.
    #[arg(long)]
    api_addr: Option<SocketAddr>,
    /// Where each span goes as a JSON line: a file (appended to) or `-` for stdout.
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Spans kept for the API; the oldest make room for new ones.
    #[arg(long, default_value_t = 20_000)]
    keep: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lines: Box<dyn std::io::Write + Send> = if args.output.as_os_str() == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&args.output)
                .with_context(|| format!("--output {}", args.output.display()))?,
        )
    };
    let store = Arc::new(Mutex::new(SpanStore::new(args.keep)));
    if let Some(addr) = args.api_addr {
        let listener = meshd_telemetry::metrics::bind("--api-addr", addr).await?;
        let store = store.clone();
        tokio::spawn(meshd_telemetry::metrics::serve_paths(
            listener,
            move |path, query| {
                let reply = api(&store, &path, query.as_deref());
                async move { reply }
            },
        ));
    }
    let grpc = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen", args.listen))?;
    eprintln!(
        "meshd-otlp-collector: OTLP/gRPC on {}{}",
        args.listen,
        args.api_addr
            .map(|a| format!(", API on http://{a}/api/spans"))
            .unwrap_or_default()
    );
    serve_grpc(grpc, TraceSink::new(store, lines), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .context("OTLP/gRPC server")
}
