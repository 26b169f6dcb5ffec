//! Errors of the apiserver library, each naming the etcd endpoints, key or file involved.

use meshd_manifest::ManifestErrors;

#[derive(Debug, thiserror::Error)]
pub enum ApiserverError {
    #[error(transparent)]
    Kv(#[from] meshd_kvstore::KvError),
    #[error(transparent)]
    State(#[from] meshd_state::StateError),
    #[error(transparent)]
    Manifests(#[from] ManifestErrors),
    #[error("etcd {endpoints}: {what} transaction: {reason}")]
    Txn {
        endpoints: String,
        what: &'static str,
        reason: String,
    },
    #[error(
        "the batch needs {ops} operations in one etcd transaction, more than etcd's limit of {max} \
         (--max-txn-ops); apply it in smaller parts"
    )]
    TooLarge { ops: usize, max: usize },
    #[error("{what}: still changing under us after several attempts (other writers); try again")]
    Contended { what: &'static str },
    #[error(
        "{key} holds cluster id {stored}, but this apiserver is configured with id {configured}: \
         two clusters share the name, or the id was changed (identities embed it)"
    )]
    ClusterConfigConflict {
        key: String,
        stored: u8,
        configured: u8,
    },
    #[error("watch ended: {reason}")]
    WatchEnded { reason: String },
    #[error("TLS files: {0}")]
    Tls(#[from] meshd_certs::CertError),
    #[error("{what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}
