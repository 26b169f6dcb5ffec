//! The apiserver's Prometheus metrics: API requests by method and gRPC code with their
//! latency (counted by the handlers as they answer), requests refused by authorization (the
//! counter `/counters` also shows) and the identities of the cluster (as the leader's view
//! counts them).

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::{Code, Status};
use tracing::Instrument as _;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~16 s: a list answers in milliseconds, an apply of many objects in seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Shared by every handler (cheap to clone); the families are prometheus-client's own atomics.
#[derive(Clone)]
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// Requests refused by authorization (also on `/counters`).
    pub refused: Arc<AtomicU64>,
    /// Identities in the leader's view; -1 on a replica that does not lead.
    pub identities: Arc<AtomicI64>,
    /// The mirror of remote clusters (`--kvstoremesh`); empty without it.
    pub mirror: crate::mirror::MirrorMetrics,
}

impl ApiMetrics {
    pub fn new(refused: Arc<AtomicU64>) -> Self {
        ApiMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(latency_histogram),
            refused,
            identities: Arc::new(AtomicI64::new(-1)),
            mirror: crate::mirror::MirrorMetrics::default(),
        }
    }

    /// Runs one API call inside its span (`apiserver.request`, exported over OTLP when the
    /// apiserver has a collector: what an operator follows from `meshd apply` to the etcd
    /// revision it wrote) and counts it under `method` with the gRPC code it answers.
    pub async fn observe<T>(
        &self,
        method: &str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let span = tracing::info_span!(
            "apiserver.request",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            // The etcd revision a write committed at (set by the call).
            meshd.revision = tracing::field::Empty,
        );
        let start = Instant::now();
        let result = call.instrument(span.clone()).await;
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        span.record("rpc.grpc.status_code", code as i32);
        if code != Code::Ok {
            span.record("otel.status_code", "ERROR");
        }
        self.record(method, code, start.elapsed().as_secs_f64());
        result
    }

    fn record(&self, method: &str, code: Code, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                code: code_name(code).to_owned(),
            })
            .inc();
        self.durations
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(seconds);
    }

    /// The text of `/metrics`.
    pub fn render(&self) -> String {
        let mut r = Registry::with_prefix("meshd_apiserver");
        r.register(
            "requests",
            "API requests answered, by gRPC method and status code.",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time to answer an API request, by gRPC method.",
            self.durations.clone(),
        );
        let refused: Counter = Counter::default();
        refused.inc_by(self.refused.load(Ordering::Relaxed));
        r.register(
            "requests_refused",
            "API requests refused by authorization (a certificate that may not use the API).",
            refused,
        );
        let identities: Gauge = Gauge::default();
        identities.set(self.identities.load(Ordering::Relaxed));
        r.register(
            "identities",
            "Identities of the cluster in the leader's view; -1 on a replica that does not lead.",
            identities,
        );
        self.mirror.register(&mut r);
        meshd_telemetry::metrics::encode(&r)
    }
}

/// gRPC's own names for its codes, as other gRPC servers label them.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_are_counted_by_method_and_code() {
        let m = ApiMetrics::new(Arc::new(AtomicU64::new(2)));
        m.observe("Apply", async { Ok::<_, Status>(()) })
            .await
            .unwrap();
        let _ = m
            .observe("Apply", async {
                Err::<(), _>(Status::permission_denied("no"))
            })
            .await;
        m.identities.store(5, Ordering::Relaxed);
        let text = m.render();
        for line in [
            "meshd_apiserver_requests_total{method=\"Apply\",code=\"OK\"} 1",
            "meshd_apiserver_requests_total{method=\"Apply\",code=\"PERMISSION_DENIED\"} 1",
            "meshd_apiserver_request_duration_seconds_count{method=\"Apply\"} 2",
            "meshd_apiserver_requests_refused_total 2",
            "meshd_apiserver_identities 5",
            "# TYPE meshd_apiserver_request_duration_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        meshd_testing::require(
            "promtool on PATH (scripts/install-deps.sh)",
            meshd_testing::promtool_check(&text).unwrap(),
        );
    }
}
