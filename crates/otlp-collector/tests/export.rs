//! The collector against the real OTLP/gRPC exporter every meshd binary uses
//! (`meshd_telemetry::otlp_provider`): a span sent over the wire is kept with its service,
//! host, parent and attributes, written as a JSON line, and found by the HTTP API's query.

use std::io::Write;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::{TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;

use meshd_otlp_collector::{api, serve_grpc, SpanStore, TraceSink};

/// A `Write` whose bytes the test can read back.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_exported_over_otlp_are_kept_written_and_queryable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = Arc::new(Mutex::new(SpanStore::new(100)));
    let lines = Lines::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_grpc(
        listener,
        TraceSink::new(store.clone(), Box::new(lines.clone())),
        async {
            let _ = stop_rx.await;
        },
    ));

    // The resource's host.name comes from OTEL_RESOURCE_ATTRIBUTES, as the labs set it per node.
    // The only test in this binary: nothing else reads the environment meanwhile.
    std::env::set_var("OTEL_RESOURCE_ATTRIBUTES", "host.name=c1-n1");
    let endpoint = format!("http://{addr}");
    let provider = tokio::task::spawn_blocking(move || {
        let provider = meshd_telemetry::otlp_provider(&endpoint, "meshd").unwrap();
        let tracer = provider.tracer("test");
        tracer.in_span("meshd.propagation", |cx| {
            cx.span()
                .set_attribute(KeyValue::new("meshd.cluster", "c2"));
            tracer.in_span("datapath.map_write", |_| {});
        });
        // Flushes the batch: the export call has returned once this does.
        provider.force_flush().unwrap();
        provider
    })
    .await
    .unwrap();

    let kept = store.lock().unwrap().query(&Default::default());
    assert_eq!(kept.len(), 2, "{kept:?}");
    let root = kept.iter().find(|s| s.name == "meshd.propagation").unwrap();
    let child = kept
        .iter()
        .find(|s| s.name == "datapath.map_write")
        .unwrap();
    assert_eq!(
        (root.service.as_str(), root.host.as_str()),
        ("meshd", "c1-n1")
    );
    assert_eq!(root.attributes["meshd.cluster"], "c2");
    assert_eq!(root.parent_span_id, "");
    assert_eq!(child.parent_span_id, root.span_id);
    assert_eq!(child.trace_id, root.trace_id);
    assert_eq!(root.trace_id.len(), 32);

    let written = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let names: Vec<String> = written
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names.len(), 2, "{written}");
    assert!(names.contains(&"meshd.propagation".to_owned()), "{written}");

    let reply = api(
        &store,
        "/api/spans",
        Some("host=c1-n1&name=meshd.propagation"),
    );
    assert_eq!(reply.status, 200);
    let found: Vec<serde_json::Value> = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(found.len(), 1, "{}", reply.body);
    assert_eq!(found[0]["span_id"], root.span_id.as_str());
    let none = api(&store, "/api/spans", Some("host=c2-n1"));
    assert_eq!(none.body, "[]");

    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .unwrap()
        .unwrap();
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
