//! TLS behaviour of the configs built from certificate files: TLS 1.3 only, our CA only, and
//! rotated files used by the next connection while existing connections keep running.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use meshd_certs::{LeafKind, LeafRequest, MeshCa, TlsFiles};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(20);

/// CA plus the three leaves of cluster c1 in a temp dir.
fn mesh() -> (tempfile::TempDir, MeshCa) {
    mesh_of("tls test CA")
}

fn mesh_of(ca_name: &str) -> (tempfile::TempDir, MeshCa) {
    let dir = tempfile::tempdir().unwrap();
    let ca = MeshCa::create(ca_name, 30).unwrap();
    ca.issue_cluster_set(
        dir.path(),
        "c1",
        10,
        &["127.0.0.1".parse().unwrap()],
        &["localhost".into()],
        false,
    )
    .unwrap();
    (dir, ca)
}

async fn handshake(
    files: &TlsFiles,
    addr: SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    handshake_as(files, addr, ServerName::IpAddress(addr.ip().into())).await
}

async fn handshake_as(
    files: &TlsFiles,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = Arc::new(files.client_config()?);
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await??;
    Ok(tls)
}

/// `openssl s_server` limited to one protocol version, on a free loopback port; killed on drop.
struct OpensslServer {
    _child: tokio::process::Child,
    addr: SocketAddr,
}

impl OpensslServer {
    async fn start(dir: &Path, version_flag: &str) -> OpensslServer {
        let port = meshd_testing::free_port();
        let mut child = tokio::process::Command::new("openssl")
            .args(["s_server", version_flag, "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join("server.pem"))
            .arg("-key")
            .arg(dir.join("server-key.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning openssl s_server");
        // s_server prints ACCEPT once it listens.
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("ACCEPT") {
                    return;
                }
            }
            panic!("openssl s_server exited before listening (port {port} taken?)");
        })
        .await
        .expect("openssl s_server listening");
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        OpensslServer {
            _child: child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

#[tokio::test]
async fn client_refuses_a_tls12_only_server() {
    if !meshd_testing::require("openssl on PATH", meshd_testing::have_binary("openssl")) {
        return;
    }
    let (dir, _ca) = mesh();
    let files = TlsFiles::in_dir(dir.path(), "admin");

    // Control: the same server restricted to TLS 1.3 completes the handshake, so the failure
    // below is about the protocol version and nothing else.
    let tls13 = OpensslServer::start(dir.path(), "-tls1_3").await;
    let stream = handshake(&files, tls13.addr)
        .await
        .expect("TLS 1.3 handshake with openssl");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(stream);
    drop(tls13);

    let tls12 = OpensslServer::start(dir.path(), "-tls1_2").await;
    let err = handshake(&files, tls12.addr)
        .await
        .expect_err("a TLS 1.2-only server must be refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("ProtocolVersion") || msg.contains("protocol version"),
        "refused for the protocol version: {msg}"
    );
    let why =
        meshd_certs::explain_tls_error(err.as_ref(), &files, "127.0.0.1").expect("a TLS error");
    assert!(why.contains("TLS 1.3"), "{why}");
}

/// A TLS 1.3 server with client-certificate auth that reports the serial of every client
/// certificate it accepts, and echoes bytes.
async fn recording_server(
    files: TlsFiles,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(files.server_config().unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                let info =
                    meshd_certs::CertInfo::from_der("client", Path::new("peer"), &peer).unwrap();
                let _ = tx.send(info.serial);
                let mut buf = [0u8; 64];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn echo(stream: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, msg);
}

fn serial_of(path: &Path) -> String {
    meshd_certs::inspect_file(path).unwrap()[0].serial.clone()
}

#[tokio::test]
async fn rotated_files_are_used_by_the_next_connection() {
    let (dir, ca) = mesh();
    let (addr, mut seen) = recording_server(TlsFiles::in_dir(dir.path(), "server")).await;
    let files = TlsFiles::in_dir(dir.path(), "admin");
    let old_serial = serial_of(&files.cert);

    let mut first = handshake(&files, addr).await.unwrap();
    echo(&mut first, b"before").await;
    assert_eq!(seen.recv().await.unwrap(), old_serial);

    // Rotate: same subject, new key and certificate, written over the old files.
    let existing = &meshd_certs::inspect_file(&files.cert).unwrap()[0];
    ca.issue(&LeafRequest::renewal_of(LeafKind::Admin, existing, 10))
        .unwrap()
        .write(dir.path(), true)
        .unwrap();
    let new_serial = serial_of(&files.cert);
    assert_ne!(new_serial, old_serial);

    let mut second = handshake(&files, addr).await.unwrap();
    echo(&mut second, b"after").await;
    assert_eq!(
        seen.recv().await.unwrap(),
        new_serial,
        "the new connection presents the new certificate"
    );
    // The connection made with the old certificate keeps working.
    echo(&mut first, b"still here").await;
}

#[tokio::test]
async fn a_server_of_another_ca_is_refused() {
    let (dir, _ca) = mesh();
    let (other, _other_ca) = mesh_of("another CA");
    let (addr, _seen) = recording_server(TlsFiles::in_dir(other.path(), "server")).await;
    let err = handshake(&TlsFiles::in_dir(dir.path(), "admin"), addr)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("UnknownIssuer"), "{err:#}");
}

#[test]
fn reading_while_rotating_never_sees_a_torn_pair() {
    let (dir, ca) = mesh();
    let files = TlsFiles::in_dir(dir.path(), "remote");
    let existing = meshd_certs::inspect_file(&files.cert).unwrap()[0].clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rotator = {
        let done = done.clone();
        let dir = dir.path().to_owned();
        std::thread::spawn(move || {
            for _ in 0..30 {
                ca.issue(&LeafRequest::renewal_of(LeafKind::Remote, &existing, 5))
                    .unwrap()
                    .write(&dir, true)
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut loads = 0;
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        files
            .client_config()
            .expect("a consistent key and certificate");
        loads += 1;
    }
    rotator.join().unwrap();
    assert!(loads > 0);
}

#[tokio::test]
async fn a_server_without_the_dialed_name_is_refused() {
    let (dir, _ca) = mesh();
    let (addr, _seen) = recording_server(TlsFiles::in_dir(dir.path(), "server")).await;
    let files = TlsFiles::in_dir(dir.path(), "admin");
    // The certificate names localhost and 127.0.0.1; dial it as another name.
    let name = ServerName::try_from("etcd.c9.mesh").unwrap();
    let err = handshake_as(&files, addr, name).await.unwrap_err();
    let why = meshd_certs::explain_tls_error(err.as_ref(), &files, "etcd.c9.mesh").unwrap();
    assert!(
        why.contains("does not name etcd.c9.mesh") && why.contains("127.0.0.1"),
        "{why}"
    );
    // Control: the names it has work.
    handshake_as(&files, addr, ServerName::try_from("localhost").unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_plaintext_server_is_explained() {
    let (dir, _ca) = mesh();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 512];
        let _ = tcp.read(&mut buf).await;
        let _ = tcp
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await;
    });
    let files = TlsFiles::in_dir(dir.path(), "admin");
    let err = handshake(&files, addr).await.unwrap_err();
    let why = meshd_certs::explain_tls_error(err.as_ref(), &files, "127.0.0.1").unwrap();
    assert!(why.contains("does not speak TLS"), "{why}");
}

/// A server of our CA that trusts only client certificates of another CA: in TLS 1.3 the client
/// finishes its handshake first and learns of the refusal on its first read.
#[tokio::test]
async fn a_server_refusing_our_client_certificate_is_explained() {
    let (dir, _ca) = mesh();
    let (other, _other_ca) = mesh_of("another CA");
    let ours = TlsFiles::in_dir(dir.path(), "server")
        .load(meshd_certs::Usage::Server, &[])
        .unwrap();
    let theirs = TlsFiles::in_dir(other.path(), "server")
        .load(meshd_certs::Usage::Server, &[])
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(theirs.roots, provider.clone())
            .build()
            .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(ours.chain, ours.key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let files = TlsFiles::in_dir(dir.path(), "admin");
    let mut stream = handshake(&files, addr)
        .await
        .expect("client side of TLS 1.3 completes");
    let _ = stream.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .unwrap()
        .expect_err("the server refuses the client certificate");
    let why = meshd_certs::explain_tls_error(&err, &files, "127.0.0.1").expect("a TLS error");
    assert!(
        why.contains(&format!(
            "refused our client certificate {}",
            files.cert.display()
        )),
        "{why}"
    );
}
