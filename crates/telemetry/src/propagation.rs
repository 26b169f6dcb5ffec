//! One OpenTelemetry trace per change a cluster's etcd propagates into a node's datapath.
//!
//! The trace's root span `meshd.propagation` runs from the agent receiving the etcd watch event
//! to the datapath map writes it caused being done, with two children: `etcd.watch_event` (the
//! event's arrival, decoded) and `datapath.map_write` (the write of the batch the change went
//! out in). The times are the agent's own; records carry no write time, so the time the change
//! spent in etcd and on the wire is not in the trace.
//!
//! Spans are built only while an OTLP exporter is configured ([`exporting`]): an agent without
//! one pays an atomic load per batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer};
use opentelemetry::{Context, KeyValue};

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Name of the tracer the agent records propagation traces with.
pub const TRACER: &str = "meshd-propagation";

/// True once [`init`](crate::init) installed an OTLP exporter as the global tracer provider.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `provider` the global tracer provider [`record`] uses, and turns recording on.
/// [`init`](crate::init) does this with its OTLP pipeline; tests with a [`Collector`].
pub fn install(provider: opentelemetry_sdk::trace::SdkTracerProvider) {
    opentelemetry::global::set_tracer_provider(provider);
    EXPORTING.store(true, Ordering::Relaxed);
}

/// An in-process collector for tests: every span ended is kept, in order.
#[derive(Debug, Clone, Default)]
pub struct Collector(Arc<Mutex<Vec<SpanData>>>);

/// A span as the [`Collector`] kept it.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// All zeros for a root span.
    pub parent_span_id: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Every attribute, its value as a string.
    pub attributes: Vec<(String, String)>,
}

impl Collector {
    /// A collector installed as the global tracer provider's only exporter (see [`install`]).
    pub fn install_global() -> Self {
        let collector = Self::default();
        install(
            opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_simple_exporter(collector.clone())
                .build(),
        );
        collector
    }

    pub fn finished(&self) -> Vec<FinishedSpan> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|s| FinishedSpan {
                name: s.name.to_string(),
                trace_id: s.span_context.trace_id().to_string(),
                span_id: s.span_context.span_id().to_string(),
                parent_span_id: s.parent_span_id.to_string(),
                start: s.start_time,
                end: s.end_time,
                attributes: s
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                    .collect(),
            })
            .collect()
    }
}

impl SpanExporter for Collector {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(batch);
        std::future::ready(Ok(()))
    }
}

/// One change that reached the datapath.
#[derive(Debug, Clone)]
pub struct Propagated<'a> {
    /// The cluster whose etcd the change came from.
    pub cluster: &'a str,
    /// What changed: `ipcache upsert`, `node delete`, ...
    pub change: &'static str,
    /// When the agent received the etcd watch event.
    pub received: SystemTime,
    /// The map writes of the batch the change went out in.
    pub write_start: SystemTime,
    pub write_end: SystemTime,
    /// Writes in that batch (several changes share one).
    pub batch_writes: u64,
}

/// Records `p` as one trace with `tracer`.
pub fn record_with<T>(tracer: &T, p: &Propagated<'_>)
where
    T: Tracer,
    T::Span: Send + Sync + 'static,
{
    let root = tracer
        .span_builder("meshd.propagation")
        .with_kind(SpanKind::Internal)
        .with_start_time(p.received)
        .with_attributes(vec![
            KeyValue::new("meshd.cluster", p.cluster.to_owned()),
            KeyValue::new("meshd.change", p.change),
        ])
        .start(tracer);
    let cx = Context::current_with_span(root);
    let mut event = tracer
        .span_builder("etcd.watch_event")
        .with_start_time(p.received)
        .with_attributes(vec![KeyValue::new("meshd.cluster", p.cluster.to_owned())])
        .start_with_context(tracer, &cx);
    event.end_with_timestamp(p.received);
    let mut write = tracer
        .span_builder("datapath.map_write")
        .with_start_time(p.write_start)
        .with_attributes(vec![KeyValue::new(
            "meshd.batch_writes",
            i64::try_from(p.batch_writes).unwrap_or(i64::MAX),
        )])
        .start_with_context(tracer, &cx);
    write.end_with_timestamp(p.write_end);
    cx.span().end_with_timestamp(p.write_end);
}

/// Records `p` through the global tracer provider when an exporter is configured.
pub fn record(p: &Propagated<'_>) {
    if exporting() {
        record_with(&opentelemetry::global::tracer(TRACER), p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::time::Duration;

    #[test]
    fn a_propagated_change_is_one_trace_from_the_event_to_the_map_write() {
        let collected = Collector::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collected.clone())
            .build();
        let tracer = provider.tracer(TRACER);
        let received = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let write_start = received + Duration::from_millis(3);
        let write_end = write_start + Duration::from_millis(1);
        for cluster in ["c2", "c3"] {
            record_with(
                &tracer,
                &Propagated {
                    cluster,
                    change: "ipcache upsert",
                    received,
                    write_start,
                    write_end,
                    batch_writes: 2,
                },
            );
        }
        provider.force_flush().unwrap();
        let spans = collected.finished();
        assert_eq!(spans.len(), 6, "{spans:#?}");
        let roots: Vec<&FinishedSpan> = spans
            .iter()
            .filter(|s| s.name == "meshd.propagation")
            .collect();
        assert_eq!(roots.len(), 2);
        // One trace per change: each root's trace holds its two children and nothing else.
        assert_ne!(roots[0].trace_id, roots[1].trace_id);
        for root in roots {
            assert_eq!((root.start, root.end), (received, write_end));
            assert!(root
                .attributes
                .contains(&("meshd.change".into(), "ipcache upsert".into())));
            let mut children: Vec<(&str, SystemTime, SystemTime)> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id && s.span_id != root.span_id)
                .inspect(|s| assert_eq!(s.parent_span_id, root.span_id))
                .map(|s| (s.name.as_str(), s.start, s.end))
                .collect();
            children.sort();
            assert_eq!(
                children,
                [
                    ("datapath.map_write", write_start, write_end),
                    ("etcd.watch_event", received, received),
                ]
            );
        }
    }
}
