//! Shared harness of the apiserver tests: certificates, a real etcd, apiservers with short
//! timers, an mTLS client, and direct etcd access for writing endpoints as an agent would.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clustermesh_apiserver::{Apiserver, Config, ConfigArgs};
use meshd_api::apiserver::{self as client, Client};
use meshd_certs::{LeafKind, MeshCa, TlsFiles};
use meshd_kvstore::{Backend, EtcdConfig, EtcdStore};
use meshd_testing::etcd::{Etcd, EtcdOptions, EtcdTls};

/// Generous: conditions are waited for, never timed.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The mesh CA and cluster c1's leaves (server with 127.0.0.1, admin, remote) in a temp dir.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca: MeshCa,
}

impl Certs {
    pub fn new() -> Certs {
        Self::named("apiserver test CA")
    }

    pub fn named(ca_name: &str) -> Certs {
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
        Certs { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn files(&self, kind: LeafKind) -> TlsFiles {
        TlsFiles::in_dir(self.dir.path(), kind.file_stem())
    }
}

/// A real etcd, plaintext or with TLS and client-certificate auth (as in production).
pub fn etcd(certs: Option<&Certs>) -> Option<Etcd> {
    if !meshd_testing::require_etcd() {
        return None;
    }
    let opts = match certs {
        None => EtcdOptions::default(),
        Some(c) => {
            let server = c.files(LeafKind::Server);
            let admin = c.files(LeafKind::Admin);
            EtcdOptions {
                tls: Some(EtcdTls {
                    ca: server.ca,
                    cert: server.cert,
                    key: server.key,
                    client_cert_auth: true,
                    etcdctl_client: Some((admin.cert, admin.key)),
                }),
                ..Default::default()
            }
        }
    };
    Some(Etcd::start_with(opts).expect("etcd starts"))
}

fn etcd_config(etcd: &Etcd, certs: &Certs, tls: bool) -> EtcdConfig {
    let mut c = EtcdConfig::new([etcd.endpoint()]);
    if tls {
        c = c.with_tls(certs.files(LeafKind::Admin));
    }
    c
}

/// Direct access to etcd, as an agent or an operator would have.
pub async fn store(etcd: &Etcd, certs: &Certs, tls: bool) -> EtcdStore {
    meshd_kvstore::connect(&etcd_config(etcd, certs, tls))
        .await
        .expect("connect to etcd")
}

/// Settings of a test apiserver: ephemeral ports, short timers.
pub fn config(etcd: &Etcd, certs: &Certs, tls: bool) -> Config {
    let server = certs.files(LeafKind::Server);
    let admin = certs.files(LeafKind::Admin);
    let (ca, cert, key) = if tls {
        (Some(admin.ca), Some(admin.cert), Some(admin.key))
    } else {
        (None, None, None)
    };
    ConfigArgs {
        cluster_name: Some("c1".into()),
        cluster_id: Some(1),
        etcd_endpoints: vec![etcd.endpoint()],
        etcd_ca: ca,
        etcd_cert: cert,
        etcd_key: key,
        listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_ca: Some(server.ca),
        tls_cert: Some(server.cert),
        tls_key: Some(server.key),
        service_cidr: Some("10.96.0.0/24".into()),
        identity_gc_grace: Some("1s".into()),
        resync_interval: Some("200ms".into()),
        leader_lease_ttl: Some("2s".into()),
        health_listen: Some("127.0.0.1:0".parse().unwrap()),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    }
    .build()
    .expect("valid test config")
}

pub async fn start(config: Config) -> Apiserver {
    Apiserver::start(config).await.expect("apiserver starts")
}

pub async fn connect(server: &Apiserver, files: &TlsFiles) -> Client {
    client::connect(&format!("https://{}", server.api_addr), files)
        .await
        .expect("client connects")
}

pub async fn admin(server: &Apiserver, certs: &Certs) -> Client {
    connect(server, &certs.files(LeafKind::Admin)).await
}

/// Waits until `check` returns `Some`, polling; panics with `what` after the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value under `key`, if any.
pub async fn get(store: &EtcdStore, key: &str) -> Option<Vec<u8>> {
    let page = store.range(key, None, 0, 1).await.unwrap();
    page.kvs
        .into_iter()
        .find(|kv| kv.key == key)
        .map(|kv| kv.value)
}

/// Every key under `prefix`.
pub async fn keys(store: &EtcdStore, prefix: &str) -> Vec<String> {
    let page = store.range(prefix, None, 0, 10_000).await.unwrap();
    page.kvs.into_iter().map(|kv| kv.key).collect()
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Documents of files as the CLI sends them (validated client-side first).
pub fn documents(paths: &[PathBuf]) -> Vec<clustermesh_apiserver::pb::SourceDocument> {
    meshd_manifest::load_paths(paths)
        .expect("valid manifests")
        .iter()
        .map(client::source_document)
        .collect()
}

pub fn service_yaml(name: &str, app: &str, annotations: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: meshd.io/v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  \
         annotations: {{ {annotations} }}\nspec:\n  selector: {{ app: {app} }}\n  \
         ports: [ {{ name: http, port: 80, targetPort: 8080, protocol: TCP }} ]\n{extra_spec}"
    )
}

pub const POLICY: &str = "apiVersion: meshd.io/v1\nkind: NetworkPolicy\n\
metadata: { name: echo-from-clients, namespace: default }\n\
spec:\n  endpointSelector: { matchLabels: { app: echo } }\n  ingress:\n    \
- fromEndpoints: [ { matchLabels: { app: client } } ]\n      \
toPorts: [ { ports: [ { port: \"8080\", protocol: TCP } ] } ]\n";

/// An endpoint as an agent publishes it: identity record and ipcache entry of cluster c1.
pub async fn add_endpoint(store: &EtcdStore, ip: &str, local_id: u16, app: &str, ns: &str) {
    let id = (1u32 << 16) | u32::from(local_id);
    store
        .put(
            &format!("meshd/state/identities/v1/c1/id/{id}"),
            format!(
                r#"{{"labels":{{"app":"{app}","meshd.io/cluster":"c1","meshd.io/namespace":"{ns}"}}}}"#
            )
            .into_bytes(),
            None,
        )
        .await
        .unwrap();
    // The agents' label-set index (meshd_kvstore::resolve_identity), which GC must clean too.
    store
        .put(
            &format!(
                "meshd/state/identity-labels/v1/c1/app={app},meshd.io/cluster=c1,meshd.io/namespace={ns}"
            ),
            id.to_string().into_bytes(),
            None,
        )
        .await
        .unwrap();
    store
        .put(
            &format!("meshd/state/ip/v1/c1/{ip}"),
            format!(
                r#"{{"prefix":"{ip}/32","identity":{id},"host_ip":"192.168.0.1","endpoint":"ep-{local_id}","namespace":"{ns}"}}"#
            )
            .into_bytes(),
            None,
        )
        .await
        .unwrap();
}

pub async fn remove_endpoint(store: &EtcdStore, ip: &str) {
    store
        .delete(&format!("meshd/state/ip/v1/c1/{ip}"))
        .await
        .unwrap();
}

/// The published record of a service of c1.
pub async fn record(store: &EtcdStore, name: &str) -> Option<meshd_state::ServiceRecord> {
    let key = format!("meshd/state/services/v1/c1/default/{name}");
    get(store, &key).await.map(|v| {
        meshd_state::decode::<meshd_state::ServiceRecord>(&key, &v)
            .unwrap()
            .1
    })
}

/// `ip:port` of each backend.
pub fn backends(r: &meshd_state::ServiceRecord) -> Vec<String> {
    r.backends
        .iter()
        .map(|b| format!("{}:{}", b.ip, b.port))
        .collect()
}

/// A plain HTTP GET (health, metrics): the status code and the whole response.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}
