//! Shared helpers of the meshd CLI tests: run the built binary, set up a mesh CA and the
//! certificates of a cluster, start a TLS etcd with client-certificate auth.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshd_certs::TlsFiles;
use meshd_testing::etcd::{Etcd, EtcdOptions, EtcdTls};

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "meshd failed: stdout {}\nstderr {}",
            self.stdout, self.stderr
        );
        self
    }

    /// Fails, and its message says every one of `parts`.
    #[track_caller]
    pub fn fails_saying(self, parts: &[&str]) -> Run {
        assert_ne!(
            self.code, 0,
            "meshd succeeded but should fail: {}",
            self.stdout
        );
        for part in parts {
            assert!(
                self.stderr.contains(part),
                "stderr lacks {part:?}: {}",
                self.stderr
            );
        }
        self
    }
}

pub fn meshd(dir: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .current_dir(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running meshd");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A temp dir with a mesh CA in `mesh-ca/`.
pub struct Mesh {
    pub dir: tempfile::TempDir,
}

impl Mesh {
    pub fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        meshd(
            dir.path(),
            &["certs", "ca", "create", "--out-dir", "mesh-ca"],
        )
        .ok();
        Mesh { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run(&self, args: &[&str]) -> Run {
        meshd(self.path(), args)
    }

    /// Issues server (SAN 127.0.0.1, localhost), admin and remote certificates of `cluster`
    /// into `<cluster>/`.
    pub fn issue_cluster(&self, cluster: &str) -> PathBuf {
        self.run(&[
            "certs",
            "issue",
            "all",
            "--cluster",
            cluster,
            "--ca",
            "mesh-ca/ca.pem",
            "--ca-key",
            "mesh-ca/ca-key.pem",
            "--out-dir",
            cluster,
            "--ip",
            "127.0.0.1",
            "--dns",
            "localhost",
        ])
        .ok();
        self.path().join(cluster)
    }
}

/// etcd with TLS and `--client-cert-auth` against the mesh CA, bootstrapped with
/// `meshd etcd bootstrap --node n1`. etcdctl of the harness uses the cluster's admin
/// certificate (admin-<cluster>, role root).
pub fn bootstrapped_etcd(mesh: &Mesh, cluster_dir: &Path) -> Etcd {
    let etcd = Etcd::start_with(EtcdOptions {
        tls: Some(EtcdTls {
            ca: cluster_dir.join("ca.pem"),
            cert: cluster_dir.join("server.pem"),
            key: cluster_dir.join("server-key.pem"),
            client_cert_auth: true,
            etcdctl_client: Some((
                cluster_dir.join("admin.pem"),
                cluster_dir.join("admin-key.pem"),
            )),
        }),
        ..Default::default()
    })
    .expect("starting etcd with TLS");
    as_admin(
        mesh,
        &etcd,
        cluster_dir,
        &["etcd", "bootstrap", "--node", "n1"],
    )
    .ok();
    etcd
}

/// `meshd ARGS` against `etcd` as the admin of the cluster in `cluster_dir` (its
/// `--endpoints`, `--ca`, `--cert`, `--key` appended).
pub fn as_admin(mesh: &Mesh, etcd: &Etcd, cluster_dir: &Path, args: &[&str]) -> Run {
    let dir = cluster_dir.display().to_string();
    let (endpoint, ca, cert, key) = (
        etcd.endpoint(),
        format!("{dir}/ca.pem"),
        format!("{dir}/admin.pem"),
        format!("{dir}/admin-key.pem"),
    );
    let mut all = args.to_vec();
    all.extend([
        "--endpoints",
        &endpoint,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
    ]);
    mesh.run(&all)
}

/// `meshd clustermesh VERB OTHER -o json` (connect, disconnect) against `etcd`, as the admin of
/// the cluster in `cluster_dir`.
pub fn clustermesh(mesh: &Mesh, etcd: &Etcd, cluster_dir: &Path, verb: &str, other: &str) -> Run {
    as_admin(
        mesh,
        etcd,
        cluster_dir,
        &["clustermesh", verb, other, "-o", "json"],
    )
}

pub fn files(cluster_dir: &Path, kind: &str) -> TlsFiles {
    TlsFiles::in_dir(cluster_dir, kind)
}

pub async fn connect(
    etcd: &Etcd,
    files: TlsFiles,
) -> Result<meshd_kvstore::EtcdStore, meshd_kvstore::KvError> {
    meshd_kvstore::connect(&meshd_kvstore::EtcdConfig::new([etcd.endpoint()]).with_tls(files)).await
}
