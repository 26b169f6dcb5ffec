//! The agent's propagation traces over OTLP: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a put in
//! a remote cluster's etcd reaches the collector as a `meshd.propagation` trace naming the
//! cluster and the change.
//!
//! The collector here is a byte sink in the node's namespace that answers the gRPC
//! connection's HTTP/2 settings and keeps what it is sent: tonic sends the export request
//! uncompressed, and protobuf carries strings as they are, so the span's name and attributes
//! show in the bytes.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::wait_for;

/// Where every agent (and apiserver) of this test exports: loopback of its own namespace.
const OTLP_PORT: u16 = 4317;

/// Accepts connections on 127.0.0.1:`port` inside network namespace `netns`, answers each
/// with an empty HTTP/2 SETTINGS frame and appends everything received to the returned buffer.
fn byte_sink(netns: &Path, port: u16) -> anyhow::Result<Arc<Mutex<Vec<u8>>>> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let ns = std::fs::File::open(netns)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let buf = received.clone();
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only (it stays in the namespace), with a valid fd.
        let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
        let listener = match entered {
            true => TcpListener::bind(("127.0.0.1", port)),
            false => Err(std::io::Error::last_os_error()),
        };
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for conn in listener.incoming().flatten() {
            let buf = buf.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                // The server's connection preface: a SETTINGS frame with no settings.
                let _ = conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
                let mut chunk = [0u8; 65536];
                while let Ok(n) = conn.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
        }
    });
    rx.recv()??;
    Ok(received)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn a_remote_put_is_exported_as_a_propagation_trace() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    // Inherited by every process the mesh starts (this test binary runs this one test).
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{OTLP_PORT}"),
    );
    let mesh = Mesh::start(MeshOptions::clusters(2, 1))?;
    let sink = byte_sink(&mesh.node("c1", "n1")?.netns, OTLP_PORT)?;
    mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    wait_for(
        "c1/n1 to export the remote put's trace",
        Duration::from_secs(60),
        || {
            let bytes = sink.lock().unwrap().clone();
            for needle in [
                "meshd.propagation",
                "etcd.watch_event",
                "datapath.map_write",
                "ipcache upsert",
            ] {
                anyhow::ensure!(
                    contains(&bytes, needle),
                    "{needle:?} not in the {} bytes received",
                    bytes.len()
                );
            }
            Ok(())
        },
    )
    .map_err(|e| e.context(mesh.logs()))?;
    Ok(())
}
