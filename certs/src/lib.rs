//! Mesh CA and certificate handling.
//!
//! One CA per mesh; per cluster three leaf certificates issued by it (see `LeafKind`): the etcd
//! server certificate, the `admin` client certificate of the cluster's own components (CN `root`,
//! the etcd root user) and the `remote` client certificate other clusters use to read this
//! cluster's etcd (CN `remote`, an etcd user with read-only access to the shared prefixes).
//!
//! `TlsFiles` is the on-disk triple (CA, certificate, key) every mTLS client and server of the
//! mesh is configured with. Files are read and validated each time a config is built, so rotated
//! files are picked up by the next connection without a restart, and a broken file is reported
//! by name and reason before any connection is attempted.

mod error;
mod handshake;
mod inspect;
mod issue;
mod pem_files;
mod tls_files;
mod validate;

pub use error::CertError;
pub use handshake::{explain, explain_tls_error, find_tls_error};
pub use inspect::{inspect_file, CertInfo};
pub use issue::{IssuedLeaf, LeafKind, LeafRequest, MeshCa, ORGANIZATION};
pub use pem_files::{read_certs, read_key, write_all_atomic, write_atomic, CERT_MODE, KEY_MODE};
pub use tls_files::{LoadedTls, TlsFiles};
pub use validate::{
    check_key_matches, check_name, check_signed_by, check_usage, check_validity, Usage,
};

/// File names in a CA directory and in every issue directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// etcd user of the admin certificate: etcd requires a user named `root` with the root role
/// before `auth enable`, and the admin certificate is that user.
pub const ADMIN_USER: &str = "root";
/// etcd user (and role) of the read-only certificate other clusters use.
pub const REMOTE_USER: &str = "remote";

/// The crypto provider of every config built here (ring, as in the rest of the workspace).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
