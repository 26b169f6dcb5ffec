//! mTLS for the gRPC API, with our own rustls configs (TLS 1.3 only, client certificate signed
//! by the mesh CA) rather than tonic's: the files are re-read for every connection, so rotated
//! certificates are used without a restart, and the client's certificate CN and OU are handed to
//! the handlers (`PeerIdentity`) for authorization.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use meshd_certs::{CertInfo, TlsFiles};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// Who is on the other end of an API connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub remote: SocketAddr,
    /// CN of the verified client certificate.
    pub common_name: Option<String>,
    /// OU of the verified client certificate: the cluster the mesh CA issued it for.
    pub organizational_unit: Option<String>,
}

/// An accepted, handshaken connection.
pub struct MtlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl Connected for MtlsConnection {
    type ConnectInfo = PeerIdentity;
    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for MtlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A client that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and completes the TLS handshake of each in its own task (a slow
/// client does not hold up the others). The server config is built from the files for every
/// connection; a broken file fails that handshake (logged) and not the server.
pub fn incoming(
    listener: TcpListener,
    files: TlsFiles,
) -> ReceiverStream<Result<MtlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let files = files.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match handshake(tcp, remote, &files).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    // A TCP probe (a port check, a load balancer) connects and closes without
                    // a handshake: not worth an info line per probe.
                    Err(Handshake::Probe) => {
                        tracing::debug!(%remote, "connection closed before the TLS handshake")
                    }
                    Err(Handshake::Failed(e)) => {
                        tracing::info!(%remote, error = %e, "API TLS handshake failed")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Why a connection did not become an API connection.
enum Handshake {
    /// Closed before saying anything.
    Probe,
    Failed(String),
}

async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    files: &TlsFiles,
) -> Result<MtlsConnection, Handshake> {
    let failed = |e: &dyn std::fmt::Display| Handshake::Failed(e.to_string());
    tcp.set_nodelay(true).map_err(|e| failed(&e))?;
    let mut config = files.server_config().map_err(|e| failed(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| Handshake::Failed(format!("no handshake within {HANDSHAKE_TIMEOUT:?}")))?
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => Handshake::Probe,
            _ => Handshake::Failed(e.to_string()),
        })?;
    let info = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|der| CertInfo::from_der("client certificate", Path::new("<peer>"), der).ok());
    let (common_name, organizational_unit) = match info {
        Some(info) => (info.common_name, info.organizational_unit),
        None => (None, None),
    };
    Ok(MtlsConnection {
        stream,
        peer: PeerIdentity {
            remote,
            common_name,
            organizational_unit,
        },
    })
}
