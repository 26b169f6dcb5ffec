//! Connecting to real etcd: plaintext, mTLS, and certificate files re-read per connection.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshd_certs::TlsFiles;
use meshd_kvstore::{connect, Backend, EtcdConfig};
use meshd_testing::etcd::{Etcd, EtcdOptions, EtcdTls};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir/<name>-ca.{pem,key}`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}-ca"),
        ],
    );
}

/// A leaf `dir/<leaf>.{pem,key}` signed by CA `ca`, with the given extended key usage.
fn leaf(dir: &Path, ca: &str, leaf: &str, eku: &str) {
    leaf_with_san(dir, ca, leaf, eku, "IP:127.0.0.1,DNS:localhost")
}

fn leaf_with_san(dir: &Path, ca: &str, leaf: &str, eku: &str, san: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{leaf}.key"),
            "-out",
            &format!("{leaf}.csr"),
            "-subj",
            &format!("/CN={leaf}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{leaf}.ext")),
        format!("subjectAltName={san}\nextendedKeyUsage={eku}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{leaf}.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-out",
            &format!("{leaf}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{leaf}.ext"),
        ],
    );
}

fn p(dir: &Path, f: &str) -> PathBuf {
    dir.join(f)
}

fn quick(config: EtcdConfig) -> EtcdConfig {
    EtcdConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..config
    }
}

#[tokio::test]
async fn plaintext_connect_put_and_read() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let etcd = Etcd::start().unwrap();
    let store = connect(&quick(EtcdConfig::new([etcd.endpoint()])))
        .await
        .unwrap();
    store
        .put("meshd/test/a", b"1".to_vec(), None)
        .await
        .unwrap();
    let page = store.range("meshd/test/", None, 0, 10).await.unwrap();
    assert_eq!(page.kvs.len(), 1);
    assert_eq!(page.kvs[0].value, b"1");
    assert_ne!(page.header.cluster_id, 0);
}

#[tokio::test]
async fn connect_fails_with_the_endpoint_named_when_nothing_listens() {
    let port = meshd_testing::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let err = connect(&quick(EtcdConfig::new([url.clone()])))
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test]
async fn second_endpoint_is_used_when_the_first_is_down() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let etcd = Etcd::start().unwrap();
    let dead = format!("http://127.0.0.1:{}", meshd_testing::free_port());
    let store = connect(&quick(EtcdConfig::new([dead, etcd.endpoint()])))
        .await
        .unwrap();
    store
        .put("meshd/test/a", b"1".to_vec(), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn mtls_rereads_rotated_files_on_reconnect() {
    if !meshd_testing::require_etcd()
        || !meshd_testing::require("openssl on PATH", meshd_testing::have_binary("openssl"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "mesh");
    ca(d, "rogue");
    leaf(d, "mesh", "server", "serverAuth");
    leaf(d, "mesh", "client", "clientAuth");
    leaf(d, "mesh", "client2", "clientAuth");
    leaf(d, "rogue", "intruder", "clientAuth");
    let mut etcd = Etcd::start_with(EtcdOptions {
        tls: Some(EtcdTls {
            ca: p(d, "mesh-ca.pem"),
            cert: p(d, "server.pem"),
            key: p(d, "server.key"),
            client_cert_auth: true,
            etcdctl_client: Some((p(d, "client.pem"), p(d, "client.key"))),
        }),
        ..Default::default()
    })
    .unwrap();
    assert!(etcd.endpoint().starts_with("https://"));

    // The files the client reads; rotation replaces their contents.
    let files = TlsFiles {
        ca: p(d, "live-ca.pem"),
        cert: p(d, "live.pem"),
        key: p(d, "live.key"),
    };
    let install = |cert: &str| {
        std::fs::copy(p(d, "mesh-ca.pem"), &files.ca).unwrap();
        std::fs::copy(p(d, &format!("{cert}.pem")), &files.cert).unwrap();
        std::fs::copy(p(d, &format!("{cert}.key")), &files.key).unwrap();
    };
    install("client");
    let config = quick(EtcdConfig::new([etcd.endpoint()]).with_tls(files.clone()));
    let store = connect(&config).await.unwrap();
    store
        .put("meshd/test/a", b"1".to_vec(), None)
        .await
        .unwrap();

    // A certificate from another CA is refused by etcd: after a reconnect, with those files in
    // place, requests fail. This shows the files are read per connection, not once.
    install("intruder");
    etcd.restart().unwrap();
    let mut failed = false;
    for _ in 0..20 {
        if store
            .put("meshd/test/a", b"2".to_vec(), None)
            .await
            .is_err()
        {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed,
        "a client certificate of an unknown CA must be refused"
    );

    // Rotated to a new valid certificate: the same client works again without a restart.
    install("client2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.put("meshd/test/a", b"3".to_vec(), None).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("waiting for reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no reconnect with the rotated certificate: {e}"),
        }
    }
    let got = etcd
        .etcdctl(&["get", "meshd/test/a", "--print-value-only"])
        .unwrap();
    assert_eq!(got.trim(), "3");
}

#[tokio::test]
async fn server_certificate_must_name_the_endpoint() {
    if !meshd_testing::require_etcd()
        || !meshd_testing::require("openssl on PATH", meshd_testing::have_binary("openssl"))
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "mesh");
    // Signed by the trusted CA, but for another name than the address we dial.
    leaf_with_san(d, "mesh", "server", "serverAuth", "DNS:etcd.example");
    leaf(d, "mesh", "client", "clientAuth");
    let etcd = Etcd::start_with(EtcdOptions {
        tls: Some(EtcdTls {
            ca: p(d, "mesh-ca.pem"),
            cert: p(d, "server.pem"),
            key: p(d, "server.key"),
            client_cert_auth: true,
            etcdctl_client: Some((p(d, "client.pem"), p(d, "client.key"))),
        }),
        ..Default::default()
    })
    .unwrap();
    let files = TlsFiles {
        ca: p(d, "mesh-ca.pem"),
        cert: p(d, "client.pem"),
        key: p(d, "client.key"),
    };
    let config = quick(EtcdConfig::new([etcd.endpoint()]).with_tls(files));
    let err = connect(&config)
        .await
        .err()
        .expect("a server certificate without 127.0.0.1 must be refused");
    assert!(
        err.to_string().contains("etcd.example"),
        "refused for the name: {err}"
    );
}

/// The connector uses the certs crate's TLS 1.3-only config: a server that speaks at most
/// TLS 1.2 (here `openssl s_server -tls1_2`, with a certificate we trust) is refused.
#[tokio::test]
async fn tls_1_2_only_server_is_refused() {
    if !meshd_testing::require("openssl on PATH", meshd_testing::have_binary("openssl")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "mesh");
    leaf(d, "mesh", "server", "serverAuth");
    leaf(d, "mesh", "client", "clientAuth");
    let port = meshd_testing::free_port();
    let mut server = Command::new("openssl")
        .current_dir(d)
        .args(["s_server", "-quiet", "-tls1_2", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cert", "server.pem", "-key", "server.key"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting openssl s_server");
    // Wait until it listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "openssl s_server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let files = TlsFiles {
        ca: p(d, "mesh-ca.pem"),
        cert: p(d, "client.pem"),
        key: p(d, "client.key"),
    };
    let config = quick(EtcdConfig::new([format!("https://127.0.0.1:{port}")]).with_tls(files));
    let result = connect(&config).await;
    let _ = server.kill();
    let _ = server.wait();
    let err = result.err().expect("a TLS 1.2-only server must be refused");
    // Refused in the handshake (not later, for not speaking HTTP/2): the server answers our
    // TLS 1.3-only hello with a protocol_version alert.
    assert!(err.to_string().contains("ProtocolVersion"), "{err}");
}
