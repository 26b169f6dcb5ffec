//! A small OTLP/gRPC trace collector for the meshd labs.
//!
//! Debian ships no OpenTelemetry collector (nor Jaeger) that the labs could install offline, so
//! the labs run this one: it accepts the OTLP trace service's `Export` calls that every meshd
//! binary makes with `--otlp-endpoint`, keeps the most recent spans in a bounded buffer, writes
//! each span as one JSON line (to stdout or a file, for `docker logs` and `jq`), and answers
//! `GET /api/spans` with the spans kept, filtered by service, host and name. It is a lab tool,
//! not a trace store: nothing survives a restart, and the oldest spans make room for new ones.
//!
//! The conversion from the wire messages ([`spans_of`]) and the buffer ([`SpanStore`]) are pure;
//! the gRPC service ([`TraceSink`]) and the HTTP API ([`api`]) are the edges.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use serde::Serialize;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;

/// One span as the collector keeps and shows it. Ids are lower-case hex, as OTLP/JSON and every
/// trace UI write them; a root span's parent is empty.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CollectedSpan {
    /// The exporter's `service.name` resource attribute (`meshd`, `clustermesh-apiserver`).
    pub service: String,
    /// Its `host.name` resource attribute, empty when it sent none (the labs set it per node).
    pub host: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// Every span attribute, its value rendered as a string.
    pub attributes: BTreeMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn render(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(|v| render(Some(v))).collect();
            format!("[{}]", items.join(","))
        }
        Some(any_value::Value::KvlistValue(kv)) => {
            let items: Vec<String> = kv
                .values
                .iter()
                .map(|kv| format!("{}={}", kv.key, render(kv.value.as_ref())))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        // A string by its index in a dictionary the request carries (profiles); spans from
        // the OpenTelemetry SDKs send strings inline.
        Some(any_value::Value::StringValueStrindex(i)) => format!("strindex:{i}"),
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> String {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| render(kv.value.as_ref()))
        .unwrap_or_default()
}

/// Every span of one export request, with its resource's service and host.
pub fn spans_of(request: &ExportTraceServiceRequest) -> Vec<CollectedSpan> {
    let mut out = Vec::new();
    for resource_spans in &request.resource_spans {
        let resource = resource_spans
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or_default();
        let service = attribute(resource, "service.name");
        let host = attribute(resource, "host.name");
        for scope in &resource_spans.scope_spans {
            for span in &scope.spans {
                out.push(CollectedSpan {
                    service: service.clone(),
                    host: host.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), render(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
    }
    out
}

/// Which kept spans a query asks for; an empty field matches every span.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpanQuery {
    pub service: String,
    pub host: String,
    pub name: String,
    /// At most this many, the most recent ones (0: no bound).
    pub limit: usize,
}

impl SpanQuery {
    /// From a URL query string (`service=meshd&host=c1-n1&name=meshd.propagation&limit=10`).
    /// Unknown keys are refused, naming the key, so that a typo does not silently match all.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = Self::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "service" => q.service = value.to_owned(),
                "host" => q.host = value.to_owned(),
                "name" => q.name = value.to_owned(),
                "limit" => {
                    q.limit = value
                        .parse()
                        .map_err(|_| format!("limit: {value:?} is not a count"))?
                }
                other => {
                    return Err(format!(
                        "unknown query key {other:?} (service, host, name, limit)"
                    ))
                }
            }
        }
        Ok(q)
    }

    fn matches(&self, span: &CollectedSpan) -> bool {
        (self.service.is_empty() || span.service == self.service)
            && (self.host.is_empty() || span.host == self.host)
            && (self.name.is_empty() || span.name == self.name)
    }
}

/// The most recent spans, at most `capacity`: the oldest make room for new ones, and the count
/// of those dropped is kept so that a reader knows the history is partial.
#[derive(Debug)]
pub struct SpanStore {
    capacity: usize,
    spans: VecDeque<CollectedSpan>,
    received: u64,
    evicted: u64,
}

impl SpanStore {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            spans: VecDeque::new(),
            received: 0,
            evicted: 0,
        }
    }

    pub fn push(&mut self, span: CollectedSpan) {
        self.received += 1;
        if self.spans.len() == self.capacity {
            self.spans.pop_front();
            self.evicted += 1;
        }
        self.spans.push_back(span);
    }

    /// The spans `query` matches, oldest first.
    pub fn query(&self, query: &SpanQuery) -> Vec<CollectedSpan> {
        let mut hits: Vec<CollectedSpan> = self
            .spans
            .iter()
            .rev()
            .filter(|s| query.matches(s))
            .take(if query.limit == 0 {
                usize::MAX
            } else {
                query.limit
            })
            .cloned()
            .collect();
        hits.reverse();
        hits
    }

    /// Spans received since start.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Spans dropped to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// The OTLP trace service: keeps every span it is sent and writes it as a JSON line.
pub struct TraceSink {
    store: Arc<Mutex<SpanStore>>,
    lines: Mutex<Box<dyn Write + Send>>,
}

impl TraceSink {
    pub fn new(store: Arc<Mutex<SpanStore>>, lines: Box<dyn Write + Send>) -> Self {
        Self {
            store,
            lines: Mutex::new(lines),
        }
    }
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = spans_of(request.get_ref());
        {
            let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
            for span in &spans {
                // A full disk or a closed pipe must not refuse the export: the spans are still
                // kept for the API, and the exporter would only retry the same batch.
                if let Ok(line) = serde_json::to_string(span) {
                    let _ = writeln!(lines, "{line}");
                }
            }
            let _ = lines.flush();
        }
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        for span in spans {
            store.push(span);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves the OTLP trace service on `listener` until `shutdown` completes.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    sink: TraceSink,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// The HTTP API's answer to `path?query`: `/api/spans` (JSON array of [`CollectedSpan`]),
/// `/metrics` (the collector's own counters), `/healthz`.
pub fn api(store: &Mutex<SpanStore>, path: &str, query: Option<&str>) -> meshd_telemetry::Reply {
    use meshd_telemetry::Reply;
    let store = store.lock().unwrap_or_else(|e| e.into_inner());
    match path {
        "/api/spans" => match SpanQuery::parse(query) {
            Ok(q) => Reply::ok(
                "application/json",
                serde_json::to_string(&store.query(&q)).unwrap_or_else(|_| "[]".into()),
            ),
            Err(e) => Reply {
                status: 400,
                content_type: "text/plain",
                body: format!("{e}\n"),
            },
        },
        "/metrics" => Reply::ok(
            meshd_telemetry::metrics::CONTENT_TYPE,
            format!(
                "# HELP meshd_otlp_collector_spans_received_total Spans received over OTLP.\n\
                 # TYPE meshd_otlp_collector_spans_received_total counter\n\
                 meshd_otlp_collector_spans_received_total {}\n\
                 # HELP meshd_otlp_collector_spans_evicted_total Spans dropped from the buffer to make room.\n\
                 # TYPE meshd_otlp_collector_spans_evicted_total counter\n\
                 meshd_otlp_collector_spans_evicted_total {}\n",
                store.received(),
                store.evicted()
            ),
        ),
        "/healthz" => Reply::ok("text/plain", "ok\n".into()),
        _ => Reply::not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn span(name: &str, host: &str) -> CollectedSpan {
        CollectedSpan {
            service: "meshd".into(),
            host: host.into(),
            name: name.into(),
            trace_id: String::new(),
            span_id: String::new(),
            parent_span_id: String::new(),
            start_unix_nano: 0,
            end_unix_nano: 0,
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn a_request_becomes_spans_with_their_resource() {
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "meshd"), kv("host.name", "c1-n1")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        name: "meshd.propagation".into(),
                        trace_id: vec![0xab; 16],
                        span_id: vec![0x01, 0x02, 0, 0, 0, 0, 0, 0x0f],
                        start_time_unix_nano: 5,
                        end_time_unix_nano: 9,
                        attributes: vec![
                            kv("meshd.cluster", "c2"),
                            KeyValue {
                                key: "meshd.batch_writes".into(),
                                value: Some(AnyValue {
                                    value: Some(any_value::Value::IntValue(3)),
                                }),
                                ..Default::default()
                            },
                        ],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let spans = spans_of(&request);
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!((s.service.as_str(), s.host.as_str()), ("meshd", "c1-n1"));
        assert_eq!(s.name, "meshd.propagation");
        assert_eq!(s.trace_id, "ab".repeat(16));
        assert_eq!(s.span_id, "010200000000000f");
        assert_eq!(s.parent_span_id, "");
        assert_eq!((s.start_unix_nano, s.end_unix_nano), (5, 9));
        assert_eq!(s.attributes["meshd.cluster"], "c2");
        assert_eq!(s.attributes["meshd.batch_writes"], "3");
    }

    #[test]
    fn the_store_keeps_the_most_recent_and_counts_the_rest() {
        let mut store = SpanStore::new(2);
        for name in ["a", "b", "c"] {
            store.push(span(name, "h"));
        }
        let names: Vec<String> = store
            .query(&SpanQuery::default())
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!((store.received(), store.evicted()), (3, 1));
    }

    #[test]
    fn queries_filter_and_limit_to_the_most_recent() {
        let mut store = SpanStore::new(10);
        store.push(span("x", "c1-n1"));
        store.push(span("y", "c1-n2"));
        store.push(span("x", "c1-n2"));
        store.push(span("x", "c1-n2"));
        let q = SpanQuery::parse(Some("host=c1-n2&name=x&limit=1")).unwrap();
        let hits = store.query(&q);
        assert_eq!(hits.len(), 1);
        assert_eq!(
            (hits[0].host.as_str(), hits[0].name.as_str()),
            ("c1-n2", "x")
        );
        let all_n2 = SpanQuery::parse(Some("host=c1-n2")).unwrap();
        assert_eq!(store.query(&all_n2).len(), 3);
    }

    #[test]
    fn a_bad_query_names_the_key() {
        let e = SpanQuery::parse(Some("hots=c1")).unwrap_err();
        assert!(e.contains("\"hots\""), "{e}");
        let e = SpanQuery::parse(Some("limit=many")).unwrap_err();
        assert!(e.starts_with("limit:"), "{e}");
        let store = Mutex::new(SpanStore::new(1));
        assert_eq!(api(&store, "/api/spans", Some("hots=1")).status, 400);
        assert_eq!(api(&store, "/nope", None).status, 404);
    }
}
