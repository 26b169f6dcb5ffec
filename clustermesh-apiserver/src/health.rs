//! `/healthz` (the process serves), `/readyz` (it can do its job: cluster config written,
//! etcd answering) and `/counters` (JSON: API requests refused by authorization) over plain HTTP, for probes and load balancers.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What readiness is made of; each part is set by the task that knows it.
#[derive(Debug, Default)]
pub struct Health {
    pub cluster_config_written: AtomicBool,
    pub etcd_reachable: AtomicBool,
    pub api_serving: AtomicBool,
    /// API requests refused by authorization (a certificate of another cluster, a node or
    /// remote certificate, a certificate from before per-cluster names).
    pub api_refused: Arc<AtomicU64>,
}

impl Health {
    /// `Ok` when ready, else the reasons it is not.
    pub fn readiness(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if !self.cluster_config_written.load(Ordering::Relaxed) {
            missing.push("cluster config not written yet");
        }
        if !self.etcd_reachable.load(Ordering::Relaxed) {
            missing.push("etcd not reachable");
        }
        if !self.api_serving.load(Ordering::Relaxed) {
            missing.push("gRPC API not serving");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body + "\n")));
    *r.status_mut() = status;
    r
}

fn route(health: &Health, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => respond(StatusCode::OK, "ok".into()),
        "/readyz" => match health.readiness() {
            Ok(()) => respond(StatusCode::OK, "ready".into()),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
        },
        "/counters" => respond(
            StatusCode::OK,
            serde_json::json!({
                "api_requests_refused": health.api_refused.load(Ordering::Relaxed),
            })
            .to_string(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "not found".into()),
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = route(&health, req.uri().path());
                async move { Ok::<_, Infallible>(r) }
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

    #[test]
    fn ready_only_when_every_part_is() {
        let h = Health::default();
        assert_eq!(route(&h, "/healthz").status(), StatusCode::OK);
        assert_eq!(
            route(&h, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        h.cluster_config_written.store(true, Ordering::Relaxed);
        h.etcd_reachable.store(true, Ordering::Relaxed);
        assert!(h.readiness().unwrap_err().contains("gRPC"));
        h.api_serving.store(true, Ordering::Relaxed);
        assert_eq!(route(&h, "/readyz").status(), StatusCode::OK);
        assert_eq!(route(&h, "/other").status(), StatusCode::NOT_FOUND);
    }
}
