//! Moving a running mesh to a new CA, with an overlap (every CA file trusts both CAs, every
//! certificate is re-issued by the new one, the old one is removed), loses no connection: an
//! established TCP connection across clusters keeps working throughout, both clusters are ready
//! at the end, changes propagate over connections made with the new certificates, and a
//! certificate of the old CA is refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use meshd_e2e::mesh::{meshd_binary, Mesh, MeshOptions};
use meshd_e2e::netns_io::{connect, echo_round_trip, spawn_echo, tcp_check};
use meshd_e2e::wait_for;

const WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 7410;

fn meshd(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(meshd_binary()?).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "meshd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every ca.pem of the clusters and nodes (not the CAs' own directories).
fn ca_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() && name != "mesh-ca" && name != "new-ca" {
                dirs.push(path);
            } else if name == "ca.pem" && dir != root {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn moving_to_a_new_ca_loses_no_connection() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 1))?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    spawn_echo(&echo.netns, PORT)?;
    let echo_addr = SocketAddr::from((echo.ip, PORT));
    wait_for("client -> echo", WAIT, || {
        tcp_check(&client.netns, echo_addr, Duration::from_secs(2))
    })?;
    let mut conn = connect(&client.netns, echo_addr, Duration::from_secs(5))?;
    echo_round_trip(&mut conn, b"before")?;

    let root = mesh.pki.dir().to_owned();
    let s = |p: &Path| p.display().to_string();
    // An old certificate, kept to show at the end that etcd refuses it.
    let old = root.join("old-admin");
    std::fs::create_dir_all(&old)?;
    for f in ["ca.pem", "admin.pem", "admin-key.pem"] {
        std::fs::copy(root.join("c1").join(f), old.join(f))?;
    }
    meshd(&[
        "certs",
        "ca",
        "create",
        "--out-dir",
        &s(&root.join("new-ca")),
    ])?;
    let (new_ca, new_key) = (root.join("new-ca/ca.pem"), root.join("new-ca/ca-key.pem"));
    let cas = ca_files(&root);
    anyhow::ensure!(cas.len() >= 4, "ca.pem files: {cas:?}");

    // 1. Every CA file trusts both; etcd reads its CA file at start only.
    for ca in &cas {
        meshd(&[
            "certs",
            "ca",
            "trust",
            "--file",
            &s(ca),
            "--add",
            &s(&new_ca),
        ])?;
    }
    for c in ["c1", "c2"] {
        mesh.cluster_mut(c)?.etcd.restart()?;
    }
    echo_round_trip(&mut conn, b"trusting both")?;

    // 2. Every certificate re-issued by the new CA, in place.
    for c in ["c1", "c2"] {
        let rotate = |kind: &str, dir: &Path| {
            meshd(&[
                "certs",
                "rotate",
                kind,
                "--out-dir",
                &s(dir),
                "--ca",
                &s(&new_ca),
                "--ca-key",
                &s(&new_key),
                "--change-ca",
            ])
        };
        rotate("all", &root.join(c))?;
        rotate("node", &root.join(c).join("n1"))?;
    }
    echo_round_trip(&mut conn, b"new certificates")?;

    // 3. The old CA goes; etcd restarts once more, everyone reconnects with the new files.
    for ca in &cas {
        meshd(&[
            "certs",
            "ca",
            "trust",
            "--file",
            &s(ca),
            "--remove",
            &s(&root.join("mesh-ca/ca.pem")),
        ])?;
    }
    for c in ["c1", "c2"] {
        mesh.cluster_mut(c)?.etcd.restart()?;
    }
    mesh.wait_all_ready(WAIT)
        .map_err(|e| e.context(mesh.logs()))?;
    // Published and watched over connections made with the new certificates only.
    let later = mesh.add_endpoint("c2", "n1", "later", "app=web")?;
    wait_for("c2's new endpoint in c1", WAIT, || {
        anyhow::ensure!(mesh.ipcache_entry("c1", "n1", later.ip)?.is_some());
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    echo_round_trip(&mut conn, b"after")?;

    // A certificate of the old CA no longer gets in: etcd refuses it (the client trusts the new
    // CA, so the refusal is the server's). Control: the re-issued admin certificate does.
    let endpoint = mesh.cluster("c1")?.etcd.endpoint();
    let get_as = |cert: &Path, key: &Path| -> anyhow::Result<std::process::Output> {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &endpoint,
                "--dial-timeout=3s",
                "--command-timeout=5s",
            ])
            .args([
                "--cacert",
                &s(&new_ca),
                "--cert",
                &s(cert),
                "--key",
                &s(key),
            ])
            .args(["get", "meshd/cluster-config/c1"])
            .output()
            .context("running etcdctl")
    };
    let refused = get_as(&old.join("admin.pem"), &old.join("admin-key.pem"))?;
    anyhow::ensure!(
        !refused.status.success(),
        "etcd still accepts a certificate of the retired CA"
    );
    let ok = get_as(&root.join("c1/admin.pem"), &root.join("c1/admin-key.pem"))?;
    anyhow::ensure!(
        ok.status.success(),
        "the new admin certificate is refused: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    Ok(())
}
