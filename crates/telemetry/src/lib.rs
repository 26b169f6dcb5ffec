//! The one place that sets up logging and tracing for every meshd binary.
//!
//! Everything else only emits `tracing` spans and events. Logs go to stderr, as plain text for
//! people or JSON for log pipelines; the filter comes from `--log-level` or `RUST_LOG`.
//! OpenTelemetry (OTLP/gRPC) export of spans is optional and off unless an endpoint is given
//! (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`); with it the agent also exports one
//! trace per change propagated from a cluster's etcd into its maps ([`propagation`]).

pub mod metrics;
pub mod propagation;

pub use metrics::Reply;

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// Flags every binary flattens into its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "MESHD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info,meshd_kvstore=debug`). RUST_LOG wins if set.
    #[arg(long, global = true, default_value = "info", env = "MESHD_LOG_LEVEL")]
    pub log_level: String,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317). Off when
    /// unset.
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Otlp { endpoint: String, reason: String },
}

/// Keeps the OTLP pipeline alive; dropping it flushes the spans not yet exported. Hold it in
/// `main` for the life of the process.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("telemetry: flushing spans at exit: {e}");
            }
        }
    }
}

/// The runtime the OTLP exporter's gRPC channel lives on. The SDK exports from its own thread
/// and polls the export future there without a reactor; tonic's channel hands requests to a
/// worker task, so spawning that worker on this runtime (by building the exporter inside it)
/// is what makes export work from any thread, also in binaries that build their own runtimes
/// per command.
fn exporter_runtime() -> Result<&'static tokio::runtime::Runtime, std::io::Error> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// An OTLP/gRPC span pipeline to `endpoint`, reporting as `service`.
pub fn otlp_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let err = |reason: String| TelemetryError::Otlp {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let rt = exporter_runtime().map_err(|e| err(e.to_string()))?;
    let _entered = rt.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| err(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The `tracing` layer that feeds `provider`.
pub fn otlp_layer<S>(provider: &SdkTracerProvider, service: &str) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer(service.to_owned()))
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything non-empty
/// (no-color.org): logs written to a file or a pipe (the lab's `agent.log`, journald) would
/// otherwise carry escape codes.
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. Call once, first thing in `main`, and keep the guard.
pub fn init(args: &TelemetryArgs, service: &str) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => env,
        _ => args.log_level.clone(),
    };
    let filter = EnvFilter::try_new(&filter).map_err(|e| TelemetryError::Filter {
        filter: filter.clone(),
        reason: e.to_string(),
    })?;
    let provider = match args.otlp_endpoint.as_deref() {
        Some(endpoint) if !endpoint.is_empty() => Some(otlp_provider(endpoint, service)?),
        _ => None,
    };
    let otlp = provider.as_ref().map(|p| otlp_layer(p, service));
    if let Some(provider) = &provider {
        // Traces built with the OpenTelemetry API directly (`propagation`) go out the same way.
        propagation::install(provider.clone());
    }
    let logs = match args.log_format {
        LogFormat::Plain => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            .with_ansi(use_colour(
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otlp)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(super::use_colour(true, None));
        assert!(super::use_colour(true, Some(OsStr::new(""))));
        assert!(!super::use_colour(true, Some(OsStr::new("1"))));
        assert!(!super::use_colour(false, None));
    }

    use super::*;
    use std::io::Read;
    use tracing_subscriber::layer::SubscriberExt;

    /// Spans reach the configured collector: a loopback listener sees the exporter's gRPC
    /// connection (the HTTP/2 client preface) once a span ends and the pipeline is flushed.
    #[test]
    fn spans_are_exported_to_the_configured_endpoint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let provider = otlp_provider(&endpoint, "meshd-test").unwrap();
        let subscriber = tracing_subscriber::registry().with(otlp_layer(&provider, "meshd-test"));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("propagation", cluster = "c1", key = "meshd/state/x");
            span.in_scope(|| tracing::info!("applied"));
        });
        let flusher = std::thread::spawn(move || {
            // No real collector answers, so the flush itself fails; what counts is the attempt.
            let _ = provider.force_flush();
            provider
        });
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut preface = [0u8; 24];
        conn.read_exact(&mut preface).unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        drop(conn);
        drop(flusher);
    }

    #[test]
    fn bad_filter_names_the_filter() {
        let args = TelemetryArgs {
            log_format: LogFormat::Plain,
            log_level: "info,[".into(),
            otlp_endpoint: None,
        };
        let err = init(&args, "meshd-test")
            .err()
            .expect("invalid filter refused");
        assert!(err.to_string().contains("info,["), "{err}");
    }
}
