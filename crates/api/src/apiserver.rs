//! The clustermesh-apiserver's gRPC API (`proto/apiserver.proto`): the generated messages and
//! services, and the client side for the `meshd` CLI and tests: an mTLS channel (TLS 1.3, the
//! mesh CA, a client certificate) and conversions from manifests to messages. The server lives
//! in `clustermesh-apiserver`; its clients need none of it.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshd_certs::TlsFiles;
use meshd_manifest::{ObjectRef, SourcedDocument};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

/// Generated messages, client and server of `meshd.apiserver.v1`.
pub mod pb {
    tonic::include_proto!("meshd.apiserver.v1");
}

pub type Client = pb::cluster_mesh_client::ClusterMeshClient<Channel>;
/// What a call fails with, so users of the client need no tonic dependency of their own.
pub use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server address {server:?}: {reason} (expected https://HOST:PORT)")]
    Address { server: String, reason: String },
    // Not a `#[source]`: the message already carries it, and `{:#}` would print it twice.
    #[error("client TLS files: {0}")]
    Tls(meshd_certs::CertError),
    #[error("cannot reach the apiserver at {server}: {reason}")]
    Connect { server: String, reason: String },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

/// Connects to `server` (`https://HOST:PORT`) presenting `files`' certificate. The server's
/// certificate must name HOST (DNS or IP SAN) and be signed by `files.ca`.
pub async fn connect(server: &str, files: &TlsFiles) -> Result<Client, ClientError> {
    let bad = |reason: &str| ClientError::Address {
        server: server.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = server.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the API is served over TLS only"));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad("no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
    // Report bad files by name before dialing.
    files.client_config().map_err(ClientError::Tls)?;
    let name = ServerName::try_from(host.clone()).map_err(|_| bad("invalid host name"))?;
    let files = files.clone();
    let dial_host = host.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let files = files.clone();
        let host = dial_host.clone();
        let name = name.clone();
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // Files read per connection: rotated client certificates are used on reconnect.
            let mut config = files.client_config()?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            Ok::<_, BoxError>(TokioIo::new(tls))
        }
    });
    let authority = if host.contains(':') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    };
    let channel = Endpoint::from_shared(authority)
        .map_err(|e| bad(&e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Connect {
            server: server.to_owned(),
            reason: source_chain(&e),
        })?;
    Ok(pb::cluster_mesh_client::ClusterMeshClient::new(channel))
}

/// A loaded document as the API carries it.
pub fn source_document(d: &SourcedDocument) -> pb::SourceDocument {
    pb::SourceDocument {
        file: d.file.clone(),
        index: d.index as u32,
        text: d.text.clone(),
    }
}

pub fn object_ref(r: &ObjectRef) -> pb::ObjectRef {
    pb::ObjectRef {
        kind: r.kind.as_str().to_owned(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    }
}
