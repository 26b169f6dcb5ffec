//! The binary tells systemd (Type=notify) it is ready once it can do its job, through the
//! socket in NOTIFY_SOCKET, as systemd itself would receive it.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use common::{etcd, Certs, DEADLINE};
use meshd_certs::LeafKind;

#[test]
fn readiness_reaches_the_notify_socket() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let server = certs.files(LeafKind::Server);
    let s = |p: &std::path::Path| p.display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .env("NOTIFY_SOCKET", &socket_path)
        .args(["--cluster-name", "c1", "--cluster-id", "1"])
        .args(["--etcd-endpoints", &etcd.endpoint()])
        .args(["--listen", "127.0.0.1:0", "--service-cidr", "10.96.0.0/24"])
        .args(["--tls-ca", &s(&server.ca), "--tls-cert", &s(&server.cert)])
        .args(["--tls-key", &s(&server.key)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let received = socket.recv(&mut buf);
    let _ = child.kill();
    let _ = child.wait();
    let n = received.expect("a notification within the deadline");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.lines().any(|l| l == "READY=1"), "{text}");
    // What it says when it is ready: the cluster config is in etcd.
    let config = etcd.etcdctl(&["get", "meshd/cluster-config/c1"]).unwrap();
    assert!(config.contains("\"id\":1"), "{config}");
}
