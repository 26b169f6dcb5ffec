//! meshd's gRPC APIs.
//!
//! At the root, the agent's API (`proto/agent.proto`), served on a Unix socket; in
//! [`apiserver`], the clustermesh-apiserver's (`proto/apiserver.proto`) with its mTLS client.
//!
//! The agent implements [`pb::agent_server::Agent`] and runs it with [`serve`]; the CLI reaches
//! it with [`connect`]. A Unix socket rather than TCP: only local root (file permissions) may
//! create endpoints, and nothing listens on the node's network.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server};

pub mod apiserver;

/// Generated messages and services.
pub mod pb {
    tonic::include_proto!("meshd.agent.v1");
}

pub use pb::agent_client::AgentClient;
pub use pb::agent_server::{Agent, AgentServer};

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/meshd/agent.sock";

/// The state word of a cluster, as `meshd status` shows it and the agent's metrics count it.
pub fn cluster_state(c: &pb::ClusterStatus) -> &'static str {
    if !c.refused.is_empty() {
        "refused"
    } else if c.stale_since_ms != 0 {
        "stale"
    } else if c.connected && !c.degraded.is_empty() {
        // Served, but not whole (over its entry limit; through the cache, the mirror also
        // withholds the sync canary of what it could not hold): see `degraded`.
        "degraded"
    } else if c.connected && c.ready {
        "ready"
    } else if c.connected {
        "syncing"
    } else {
        "connecting"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("API socket {path}: serving: {source}")]
    Serve {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("cannot reach the meshd agent at {path} (is `meshd agent` running?): {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// Binds `path` (replacing a stale socket of an earlier run, creating the directory) with mode
/// 0600. Binding is separate from serving so that the caller knows the socket exists (and
/// clients can connect) before it spawns the server.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |what: &'static str| {
        move |source| ApiError::Socket {
            path: path.to_owned(),
            what,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err("creating its directory"))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing the old socket")(e)),
    }
    let listener = UnixListener::bind(path).map_err(err("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("setting mode 0600"))?;
    Ok(listener)
}

/// Serves `agent` on `listener` until `shutdown` completes.
pub async fn serve<A: Agent>(
    path: &Path,
    listener: UnixListener,
    agent: A,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    Server::builder()
        .add_service(AgentServer::new(agent))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|source| ApiError::Serve {
            path: path.to_owned(),
            source,
        })
}

/// Connects to the agent listening on `path`.
pub async fn connect(path: &Path) -> Result<AgentClient<Channel>, ApiError> {
    let socket = path.to_owned();
    // The URI is required by tonic but unused: the connector below dials the socket.
    let channel = Endpoint::from_static("http://agent.local")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| ApiError::Connect {
            path: path.to_owned(),
            source,
        })?;
    Ok(AgentClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Request, Response, Status};

    struct Fake;

    #[tonic::async_trait]
    impl Agent for Fake {
        async fn add_endpoint(
            &self,
            req: Request<pb::AddEndpointRequest>,
        ) -> Result<Response<pb::Endpoint>, Status> {
            let req = req.into_inner();
            Ok(Response::new(pb::Endpoint {
                name: req.name,
                namespace: req.namespace,
                labels: req.labels,
                ..Default::default()
            }))
        }
        async fn delete_endpoint(
            &self,
            req: Request<pb::DeleteEndpointRequest>,
        ) -> Result<Response<pb::DeleteEndpointResponse>, Status> {
            Err(Status::not_found(req.into_inner().name))
        }
        async fn list_endpoints(
            &self,
            _: Request<pb::ListEndpointsRequest>,
        ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
            Ok(Response::new(pb::ListEndpointsResponse::default()))
        }
        async fn status(
            &self,
            _: Request<pb::StatusRequest>,
        ) -> Result<Response<pb::StatusResponse>, Status> {
            Ok(Response::new(pb::StatusResponse::default()))
        }
        type MonitorStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<pb::DropNotification, Status>>>;
        async fn monitor(
            &self,
            _: Request<pb::MonitorRequest>,
        ) -> Result<Response<Self::MonitorStream>, Status> {
            let drop = |reason| {
                Ok(pb::DropNotification {
                    reason,
                    ..Default::default()
                })
            };
            Ok(Response::new(tokio_stream::iter(vec![
                drop(-134),
                drop(-133),
            ])))
        }
        type ObserveStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<pb::FlowNotification, Status>>>;
        async fn observe(
            &self,
            _: Request<pb::ObserveRequest>,
        ) -> Result<Response<Self::ObserveStream>, Status> {
            Ok(Response::new(tokio_stream::iter(Vec::new())))
        }
    }

    #[tokio::test]
    async fn round_trip_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server_path = path.clone();
        let server = tokio::spawn(async move {
            serve(&server_path, listener, Fake, async {
                let _ = stopped.await;
            })
            .await
        });
        let mut client = connect(&path).await.unwrap();
        let ep = client
            .add_endpoint(pb::AddEndpointRequest {
                name: "web".into(),
                namespace: "default".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ep.name, "web");
        assert_eq!(ep.labels["app"], "web");
        let err = client
            .delete_endpoint(pb::DeleteEndpointRequest { name: "x".into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        // A server stream over the socket, to its end.
        let mut drops = client
            .monitor(pb::MonitorRequest {})
            .await
            .unwrap()
            .into_inner();
        let mut reasons = Vec::new();
        while let Some(d) = drops.message().await.unwrap() {
            reasons.push(d.reason);
        }
        assert_eq!(reasons, [-134, -133]);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connecting_without_an_agent_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let err = connect(&path).await.unwrap_err();
        assert!(err.to_string().contains("none.sock"), "{err}");
    }

    #[test]
    fn binding_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            drop(bind(&path).unwrap());
            assert!(path.exists());
            drop(bind(&path).unwrap());
        });
    }
}
