//! Connecting to etcd, plaintext or mTLS.
//!
//! tonic's own TLS (what etcd-client uses by default) can neither restrict the protocol to
//! TLS 1.3 nor re-read rotated certificate files, so we hand etcd-client a tonic channel over our
//! own connector (`raw-channel` feature, `Client::from_channel`). The connector dials TCP and,
//! for `https://` endpoints, builds a fresh rustls config from the PEM files on every new
//! connection (`TlsFiles::client_config`: TLS 1.3 only, our CA only, client certificate) and
//! verifies the server's name or IP SAN. A rotated certificate is therefore picked up by the
//! next reconnect without a restart.
//!
//! With several endpoints the connector tries them in turn, starting after the last one that
//! worked, so a reconnect fails over to another member.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use meshd_certs::TlsFiles;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::KvError;
use crate::etcd::EtcdStore;

/// How to reach one etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`; `https` needs `tls`.
    pub endpoints: Vec<String>,
    /// CA, client certificate and key; re-read on every new connection.
    pub tls: Option<TlsFiles>,
    /// Per TCP + TLS connection attempt, per endpoint.
    pub connect_timeout: Duration,
    /// Per unary request (get, put, grant, ...). Watches are long-lived and not bounded by it.
    pub request_timeout: Duration,
    /// HTTP/2 pings on idle connections, so a silently dead peer (partition, frozen process)
    /// is noticed and watches reconnect instead of waiting forever.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl EtcdConfig {
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }

    pub fn with_tls(mut self, tls: TlsFiles) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Endpoints joined for error messages and logs.
    pub fn describe(&self) -> String {
        self.endpoints.join(",")
    }
}

#[derive(Debug, Clone)]
struct Target {
    url: String,
    /// Host as written, without IPv6 brackets: what the certificate must name.
    host: String,
    port: u16,
    tls: bool,
}

fn parse_targets(config: &EtcdConfig) -> Result<Vec<Target>, KvError> {
    let bad = |url: &str, reason: &str| KvError::Config {
        endpoints: config.describe(),
        reason: format!("endpoint {url:?}: {reason}"),
    };
    if config.endpoints.is_empty() {
        return Err(KvError::Config {
            endpoints: String::new(),
            reason: "no etcd endpoints configured".into(),
        });
    }
    let mut targets = Vec::new();
    for url in &config.endpoints {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| bad(url, &format!("not a URL: {e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad(url, "scheme must be http:// or https://")),
        };
        if tls && config.tls.is_none() {
            return Err(bad(url, "https:// needs CA, certificate and key files"));
        }
        if !tls && config.tls.is_some() {
            return Err(bad(
                url,
                "TLS files are configured but the endpoint is http://",
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad(url, "no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(2379);
        targets.push(Target {
            url: url.clone(),
            host,
            port,
            tls,
        });
    }
    Ok(targets)
}

/// Connects and checks that the cluster answers (a `Status` call, allowed for every user, also
/// read-only remote ones). Errors name the endpoints.
pub async fn connect(config: &EtcdConfig) -> Result<EtcdStore, KvError> {
    let store = connect_lazy(config).await?;
    store.status().await?;
    Ok(store)
}

/// Builds the client without contacting etcd; connections are made (and re-made) on use.
/// Fails only on configuration errors, including unreadable or invalid TLS files.
pub async fn connect_lazy(config: &EtcdConfig) -> Result<EtcdStore, KvError> {
    let targets = parse_targets(config)?;
    if let Some(files) = &config.tls {
        // Report bad files now, with their paths, rather than as a handshake failure later.
        files.client_config().map_err(|source| KvError::Tls {
            endpoints: config.describe(),
            source,
        })?;
    }
    let connector = Connector {
        shared: Arc::new(Shared {
            targets,
            tls: config.tls.clone(),
            next: AtomicUsize::new(0),
            connect_timeout: config.connect_timeout,
        }),
    };
    // The URI only names the :authority of requests; the connector decides where to dial. It
    // is http:// even for TLS so tonic does not wrap our TLS stream in its own.
    let first = &connector.shared.targets[0];
    let authority = if first.host.contains(':') {
        format!("http://[{}]:{}", first.host, first.port)
    } else {
        format!("http://{}:{}", first.host, first.port)
    };
    let endpoint = tonic::transport::Endpoint::from_shared(authority)
        .map_err(|e| KvError::Config {
            endpoints: config.describe(),
            reason: e.to_string(),
        })?
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = endpoint.connect_with_connector_lazy(connector);
    // `require_leader`: a member cut off from its leader fails requests and ends watches
    // instead of serving a silently frozen view, so readers move on to another member.
    let options = etcd_client::ConnectOptions::new().with_require_leader(true);
    // Without a user and password, `from_channel` does no I/O.
    let client =
        etcd_client::Client::from_channel(etcd_client::Channel::Tonic(channel), Some(options))
            .await
            .map_err(|source| KvError::Config {
                endpoints: config.describe(),
                reason: source.to_string(),
            })?;
    Ok(EtcdStore::new(client, config.clone()))
}

/// Both plaintext and TLS connections behind one type for hyper.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

struct Shared {
    targets: Vec<Target>,
    tls: Option<TlsFiles>,
    next: AtomicUsize,
    connect_timeout: Duration,
}

#[derive(Clone)]
struct Connector {
    shared: Arc<Shared>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let n = shared.targets.len();
            let start = shared.next.load(Ordering::Relaxed);
            let mut errors = Vec::new();
            for i in 0..n {
                let idx = (start + i) % n;
                let target = &shared.targets[idx];
                match dial(&shared, target).await {
                    Ok(io) => {
                        // The channel asks for a new connection only when it lost the one it
                        // had: the next one starts after this member. Starting at it again
                        // would return to a member that accepts connections but never answers
                        // (a frozen process, or one that completes TLS and then hangs) for as
                        // long as it stays so; keepalives end each such connection, and each
                        // reconnect would dial it first again.
                        shared.next.store((idx + 1) % n, Ordering::Relaxed);
                        return Ok(TokioIo::new(io));
                    }
                    Err(e) => {
                        tracing::debug!(endpoint = %target.url, error = %e, "etcd connection attempt failed");
                        errors.push(format!("{}: {e}", target.url));
                    }
                }
            }
            // Next time start with the member after the one tried first.
            shared.next.store((start + 1) % n, Ordering::Relaxed);
            let msg = errors.join("; ");
            tracing::warn!(error = %msg, "cannot connect to any etcd endpoint");
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, msg).into())
        })
    }
}

async fn dial(shared: &Shared, target: &Target) -> Result<Box<dyn Io>, BoxError> {
    let attempt = async {
        let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        tcp.set_nodelay(true)?;
        if !target.tls {
            return Ok::<Box<dyn Io>, BoxError>(Box::new(tcp));
        }
        let files = shared
            .tls
            .as_ref()
            .ok_or("https endpoint without TLS files")?;
        // Read the files for every connection: this is what makes rotation work.
        let mut config = files.client_config()?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(target.host.clone())
            .map_err(|e| format!("{:?} is not a valid server name: {e}", target.host))?;
        // A handshake error says "UnknownIssuer" or "BadCertificate"; say which file and side.
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                meshd_certs::explain_tls_error(&e, files, &target.host)
                    .unwrap_or_else(|| e.to_string())
            })?;
        Ok(Box::new(tls))
    };
    match tokio::time::timeout(shared.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", shared.connect_timeout).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_against_tls_settings() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
        };
        assert!(parse_targets(&EtcdConfig::new(["http://127.0.0.1:2379"])).is_ok());
        assert!(parse_targets(&EtcdConfig::new(Vec::<String>::new())).is_err());
        assert!(parse_targets(&EtcdConfig::new(["127.0.0.1:2379"])).is_err());
        assert!(parse_targets(&EtcdConfig::new(["https://127.0.0.1:2379"])).is_err());
        let with_tls = EtcdConfig::new(["http://127.0.0.1:2379"]).with_tls(files.clone());
        assert!(parse_targets(&with_tls).is_err());
        let t = parse_targets(&EtcdConfig::new(["https://[::1]:23"]).with_tls(files)).unwrap();
        assert_eq!((t[0].host.as_str(), t[0].port, t[0].tls), ("::1", 23, true));
    }

    #[tokio::test]
    async fn unreadable_tls_files_are_reported_with_their_path() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
        };
        let err = connect_lazy(&EtcdConfig::new(["https://127.0.0.1:1"]).with_tls(files))
            .await
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
