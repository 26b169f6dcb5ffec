//! kvstore errors: each names the etcd endpoints and, where there is one, the key or prefix.

use meshd_state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("etcd {endpoints}: bad configuration: {reason}")]
    Config { endpoints: String, reason: String },
    #[error("etcd {endpoints}: TLS files: {source}")]
    Tls {
        endpoints: String,
        #[source]
        source: meshd_certs::CertError,
    },
    #[error("etcd {endpoints}: {op} {key:?}: {source}")]
    Etcd {
        endpoints: String,
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {endpoints}: {op} {key:?}: no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        op: &'static str,
        key: String,
        timeout: std::time::Duration,
    },
    /// The requested revision is older than the oldest one etcd still keeps.
    #[error("etcd {endpoints}: {op} {key:?}: revision {revision} is compacted (oldest kept {compact_revision})")]
    Compacted {
        endpoints: String,
        op: &'static str,
        key: String,
        revision: i64,
        compact_revision: i64,
    },
    /// The lease was not found: it expired or etcd lost it. The publisher takes a new one.
    #[error("etcd {endpoints}: lease {lease:x} not found (expired or revoked)")]
    LeaseNotFound { endpoints: String, lease: i64 },
    /// The store is unreachable (the in-memory store's simulated outage, a closed stream).
    #[error("etcd {endpoints}: {op} {key:?}: unavailable: {reason}")]
    Unavailable {
        endpoints: String,
        op: &'static str,
        key: String,
        reason: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

impl KvError {
    /// etcd refused the request for the certificate's user (no such user, or no permission on
    /// the key): the credentials, not the network, are what to fix.
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Self::Etcd {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            } => {
                status.code() == tonic::Code::PermissionDenied
                    // etcd 3.4 answers a certificate whose CN is no user with "user name not
                    // found" (InvalidArgument), not PermissionDenied.
                    || status.message().contains("user name not found")
            }
            _ => false,
        }
    }

    /// Whether retrying later can help (as opposed to a configuration or data error).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Etcd { .. }
                | Self::Timeout { .. }
                | Self::Unavailable { .. }
                | Self::Compacted { .. }
                | Self::LeaseNotFound { .. }
        )
    }
}
