//! `/metrics` in the Prometheus text exposition format (0.0.4), over plain HTTP, for every
//! binary that has a `--metrics-addr`. Each binary owns its `Registry` (built per scrape from
//! its published snapshots, or kept and updated where it counts events itself); this module
//! only binds, encodes and serves.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use prometheus_client::registry::Registry;

/// What Prometheus expects for the text format it asked for.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics listener could not be opened; `field` is the option that named the address.
#[derive(Debug, thiserror::Error)]
#[error("{field} {addr}: cannot listen for /metrics: {source}")]
pub struct MetricsBindError {
    pub field: &'static str,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener; a port already in use is an error naming `field`.
pub async fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, MetricsBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsBindError {
            field,
            addr,
            source,
        })
}

/// The registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a metric type.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

/// One HTTP answer of a [`serve_paths`] handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: 200,
            content_type,
            body,
        }
    }

    pub fn not_found() -> Self {
        Self {
            status: 404,
            content_type: "text/plain",
            body: "not found\n".into(),
        }
    }
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(reply.body)));
    *r.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = reply.content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves `/metrics` (the text `render` returns, asked once per scrape) until the task is
/// dropped; any other path is 404.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    serve_paths(listener, move |path, _query| {
        let render = render.clone();
        async move {
            match path.as_str() {
                "/metrics" => Reply::ok(CONTENT_TYPE, render().await),
                _ => Reply::not_found(),
            }
        }
    })
    .await
}

/// Serves plain HTTP/1.1 GETs until the task is dropped: `handle` gets each request's path and
/// query string (without the `?`) and answers it. For small read-only endpoints beside
/// `/metrics` (the lab's trace collector's queries).
pub async fn serve_paths<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(String, Option<String>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                let path = req.uri().path().to_owned();
                let query = req.uri().query().map(str::to_owned);
                async move { Ok::<_, Infallible>(respond(handle(path, query).await)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn a_port_in_use_names_the_field() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind("metrics_addr", addr).await.unwrap_err();
        assert!(e.to_string().starts_with("metrics_addr "), "{e}");
    }

    #[test]
    fn counters_get_their_total_suffix() {
        let mut r = Registry::with_prefix("meshd");
        let c: Counter = Counter::default();
        c.inc_by(3);
        r.register("things", "Things seen.", c);
        let text = encode(&r);
        assert!(text.contains("# TYPE meshd_things_total counter"), "{text}");
        assert!(text.contains("meshd_things_total 3"), "{text}");
    }
}
