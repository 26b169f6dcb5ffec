//! Health check node ports (issue 14): for each local `externalTrafficPolicy: Local` service
//! with a health check node port, an HTTP listener on the node IP at that port answers an
//! external load balancer's probe as kube-proxy does: 200 while this node has at least one
//! ready backend of the service, 503 otherwise, with a small JSON body giving the count. The
//! load balancer then sends clients only to nodes that serve them without the SNAT hop (the
//! datapath refuses a Local service's new connections on a node without a backend).
//!
//! One task owns every listener ([`HealthCheckServer::run`]): it follows the view task's
//! published [`HealthChecks`], opens a listener for a new port, closes the one of a port that
//! went, and hands each listener's connections the current answer through a watch channel, so
//! a backend change costs a channel write, not a new listener. A port that cannot be bound (in
//! use by another program) is logged and counted in the status, and tried again on the next
//! change; it never stops the agent.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshd_mesh::HealthCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the view task publishes: every health check node port this node serves, and the view's
/// revision of them (so the publisher copies them only when they changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthChecks {
    pub revision: u64,
    pub ports: BTreeMap<u16, HealthCheck>,
}

/// What the listeners do, for the status: ports served and ports that could not be bound.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthCheckStatus {
    pub serving: Vec<u16>,
    /// Port -> why it is not served (the bind error).
    pub failed: BTreeMap<u16, String>,
}

/// A probe that sends nothing within this time gets no answer: a stuck client must not hold a
/// connection (and its task) forever.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Enough for any probe's request line and headers; the rest is not read.
const MAX_REQUEST: usize = 4096;

pub struct HealthCheckServer {
    pub node_ip: IpAddr,
    pub desired: watch::Receiver<Arc<HealthChecks>>,
    pub status: watch::Sender<HealthCheckStatus>,
}

/// One open listener: its accept loop and the answer its connections read.
struct Listener {
    answer: watch::Sender<HealthCheck>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Aborting the accept loop drops the socket: the port is free again.
        self.task.abort();
    }
}

impl HealthCheckServer {
    pub async fn run(mut self) {
        let mut listeners: BTreeMap<u16, Listener> = BTreeMap::new();
        loop {
            let desired = self.desired.borrow_and_update().clone();
            listeners.retain(|port, _| desired.ports.contains_key(port));
            let mut failed = BTreeMap::new();
            for (port, check) in &desired.ports {
                if let Some(l) = listeners.get(port) {
                    l.answer.send_if_modified(|old| {
                        let changed = old != check;
                        if changed {
                            *old = check.clone();
                        }
                        changed
                    });
                    continue;
                }
                let addr = SocketAddr::new(self.node_ip, *port);
                match TcpListener::bind(addr).await {
                    Ok(socket) => {
                        let (answer, rx) = watch::channel(check.clone());
                        tracing::info!(%addr, service = %format!("{}/{}", check.namespace, check.name),
                            "serving a health check node port");
                        listeners.insert(
                            *port,
                            Listener {
                                answer,
                                task: tokio::spawn(serve(socket, rx)),
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(%addr, service = %format!("{}/{}", check.namespace, check.name),
                            error = %e, "health check node port not served (tried again on the next change)");
                        failed.insert(*port, e.to_string());
                    }
                }
            }
            self.status.send_replace(HealthCheckStatus {
                serving: listeners.keys().copied().collect(),
                failed,
            });
            if self.desired.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Accepts probes on `listener` until aborted, each answered from `answer` as it stands.
async fn serve(listener: TcpListener, answer: watch::Receiver<HealthCheck>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let check = answer.borrow().clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &check).await {
                        tracing::debug!(error = %e, "health check probe");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a health check probe");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads the request's head (any method and path answer the same, as kube-proxy's do) and
/// writes the answer.
async fn respond(mut stream: TcpStream, check: &HealthCheck) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf[len..]))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
        if n == 0 {
            break;
        }
        len += n;
    }
    stream.write_all(response(check).as_bytes()).await?;
    stream.shutdown().await
}

/// The HTTP response to a probe: kube-proxy's status codes and body.
pub fn response(check: &HealthCheck) -> String {
    let (status, reason) = if check.local_endpoints > 0 {
        (200, "OK")
    } else {
        (503, "Service Unavailable")
    };
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints,
        }
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A free port on loopback, found by binding port 0 and letting it go.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn wait_status(
        status: &mut watch::Receiver<HealthCheckStatus>,
        ok: impl Fn(&HealthCheckStatus) -> bool,
    ) -> HealthCheckStatus {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let s = status.borrow_and_update().clone();
                if ok(&s) {
                    return s;
                }
                status.changed().await.expect("server gone");
            }
        })
        .await
        .expect("status in time")
    }

    #[test]
    fn the_answer_is_kube_proxys() {
        let up = response(&check(2));
        assert!(up.starts_with("HTTP/1.1 200 OK\r\n"), "{up}");
        let body = up.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "web");
        assert!(up.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(response(&check(0)).starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }

    /// Listeners open and close with the published ports, answers follow the count, and a
    /// port in use is reported while the others are served.
    #[tokio::test]
    async fn listeners_follow_the_published_health_checks() {
        let (port, busy_port) = (free_port(), free_port());
        let _busy = std::net::TcpListener::bind(("127.0.0.1", busy_port)).unwrap();
        let (desired_tx, desired) = watch::channel(Arc::new(HealthChecks::default()));
        let (status_tx, mut status) = watch::channel(HealthCheckStatus::default());
        let server = tokio::spawn(
            HealthCheckServer {
                node_ip: "127.0.0.1".parse().unwrap(),
                desired,
                status: status_tx,
            }
            .run(),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let publish = |revision: u64, ports: &[(u16, usize)]| {
            desired_tx.send_replace(Arc::new(HealthChecks {
                revision,
                ports: ports.iter().map(|(p, n)| (*p, check(*n))).collect(),
            }));
        };

        publish(1, &[(port, 0), (busy_port, 1)]);
        let s = wait_status(&mut status, |s| s.serving == [port]).await;
        assert!(s.failed.contains_key(&busy_port), "{s:?}");
        assert!(get(addr).await.starts_with("HTTP/1.1 503 "));

        publish(2, &[(port, 1)]);
        // The answer changes without a new listener: poll until the probe sees it.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !get(addr).await.starts_with("HTTP/1.1 200 ") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("200 once a local backend is there");
        let s = wait_status(&mut status, |s| s.failed.is_empty()).await;
        assert_eq!(s.serving, [port]);

        publish(3, &[]);
        wait_status(&mut status, |s| s.serving.is_empty()).await;
        // Closed: the port can be bound again.
        tokio::time::timeout(Duration::from_secs(10), async {
            while std::net::TcpListener::bind(addr).is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("port released");
        drop(desired_tx);
        server.await.unwrap();
    }
}
