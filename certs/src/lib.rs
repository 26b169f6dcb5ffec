//! Mesh CA and certificate handling.
//!
//! One CA per mesh; per cluster the leaf certificates issued by it (see `LeafKind`): the etcd
//! server certificate, the `admin` client certificate of the cluster's apiserver and operators
//! (CN `admin-<cluster>`), one `node` certificate per node for its agent (CN
//! `node-<cluster>-<node>`) and the `remote` certificate the cluster's agents read other
//! clusters with (CN `remote-<cluster>`). Every client CN carries its cluster, and `Principal`
//! reads it back for authorization: one CA signs every cluster, so a name without its cluster
//! would open every cluster.
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
mod principal;
mod tls_files;
mod trust;
mod validate;

pub use error::CertError;
pub use handshake::{explain, explain_tls_error, find_tls_error};
pub use inspect::{inspect_file, CertInfo};
pub use issue::{IssuedLeaf, LeafKind, LeafRequest, MeshCa, ORGANIZATION};
pub use pem_files::{read_certs, read_key, write_all_atomic, write_atomic, CERT_MODE, KEY_MODE};
pub use principal::{Principal, PrincipalError, Role, LEGACY_COMMON_NAMES};
pub use tls_files::{LoadedTls, TlsFiles};
pub use trust::TrustBundle;
pub use validate::{
    check_key_matches, check_name, check_signed_by, check_usage, check_validity, Usage,
};

/// File names in a CA directory and in every issue directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// etcd's superuser: etcd refuses `auth enable` without a user of this name holding the root
/// role, so every cluster's etcd has it. No certificate of the mesh carries this CN (see
/// `Principal`); the cluster's admin user holds the root role instead.
pub const ETCD_ROOT_USER: &str = "root";

/// The crypto provider of every config built here (ring, as in the rest of the workspace).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
